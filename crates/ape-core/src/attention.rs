//! The key/value cache and causal self-attention over it.
//!
//! Keys are stored after RoPE, as f16, head-major, so one head's keys for consecutive
//! positions are contiguous. Scores are computed in f32 and every softmax is taken over the
//! keys a query may see and nothing else: no mask values, no padding.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::kernels::{axpy_f16, dot_f16, exp_shifted_sum, gemm_nn, gemm_nt};

/// Queries handled together by one block of the batched (prefill) path.
const QUERY_BLOCK: usize = 64;

/// Keys and values of one layer for up to `capacity` positions.
pub struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
}

/// The key/value cache of a whole model for one sequence.
pub struct KvCache {
    pub kv_heads: usize,
    pub head_dim: usize,
    capacity: usize,
    len: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let size = kv_heads * capacity * head_dim;
        KvCache {
            kv_heads,
            head_dim,
            capacity,
            len: 0,
            layers: (0..layers)
                .map(|_| LayerKv {
                    k: vec![f16::ZERO; size],
                    v: vec![f16::ZERO; size],
                })
                .collect(),
        }
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forget everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn advance(&mut self, n: usize) {
        assert!(self.len + n <= self.capacity);
        self.len += n;
    }

    /// Store the keys and values of `k.len() / (kv_heads * head_dim)` new tokens (rows of
    /// `kv_heads * head_dim`) at positions `len..` of `layer`.
    pub(crate) fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (d, row) = (self.head_dim, self.kv_heads * self.head_dim);
        let n = k.len() / row;
        assert!(self.len + n <= self.capacity, "KV cache overflow");
        let layer = &mut self.layers[layer];
        for t in 0..n {
            for g in 0..self.kv_heads {
                let at = (g * self.capacity + self.len + t) * d;
                let from = t * row + g * d;
                layer.k[at..at + d].convert_from_f32_slice(&k[from..from + d]);
                layer.v[at..at + d].convert_from_f32_slice(&v[from..from + d]);
            }
        }
    }

    fn head(&self, layer: usize, g: usize, upto: usize) -> (&[f16], &[f16]) {
        let l = &self.layers[layer];
        let at = g * self.capacity * self.head_dim;
        let end = at + upto * self.head_dim;
        (&l.k[at..end], &l.v[at..end])
    }

    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.kv_heads * self.capacity * self.head_dim * 2
    }
}

/// Causal attention of `n` new queries (`q`: n rows of `heads * head_dim`, after RoPE)
/// whose own keys and values are already in `cache` at positions `cache.len()..+n`.
/// Query `i` sees positions `0..=cache.len() + i`. Writes `out`, shaped like `q`.
pub fn causal_attention(q: &[f32], heads: usize, cache: &KvCache, layer: usize, out: &mut [f32]) {
    let d = cache.head_dim;
    let n = q.len() / (heads * d);
    let start = cache.len();
    let group = heads / cache.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut per_head = vec![0f32; heads * n * d];

    if n < QUERY_BLOCK {
        per_head
            .par_chunks_mut(n * d)
            .enumerate()
            .for_each(|(h, out_h)| {
                let (k, v) = cache.head(layer, h / group, start + n);
                let mut scores = Vec::with_capacity(start + n);
                for (i, out_i) in out_h.chunks_exact_mut(d).enumerate() {
                    let q_i = &q[i * heads * d + h * d..][..d];
                    let visible = start + i + 1;
                    scores.clear();
                    scores.extend(
                        k[..visible * d]
                            .chunks_exact(d)
                            .map(|k_j| dot_f16(k_j, q_i) * scale),
                    );
                    softmax_in_place(&mut scores);
                    for (p, v_j) in scores.iter().zip(v.chunks_exact(d)) {
                        axpy_f16(out_i, *p, v_j);
                    }
                }
            });
    } else {
        let total = start + n;
        let kv_f32: Vec<(Vec<f32>, Vec<f32>)> = (0..cache.kv_heads)
            .into_par_iter()
            .map(|g| {
                let (k, v) = cache.head(layer, g, total);
                let mut kf = vec![0f32; k.len()];
                let mut vf = vec![0f32; v.len()];
                k.convert_to_f32_slice(&mut kf);
                v.convert_to_f32_slice(&mut vf);
                (kf, vf)
            })
            .collect();
        per_head
            .par_chunks_mut(n * d)
            .enumerate()
            .for_each(|(h, out_h)| {
                let (kf, vf) = &kv_f32[h / group];
                out_h
                    .par_chunks_mut(QUERY_BLOCK * d)
                    .enumerate()
                    .for_each(|(b, out_b)| {
                        let first = b * QUERY_BLOCK;
                        let rows = out_b.len() / d;
                        let keys = start + first + rows;
                        let mut scores = vec![0f32; rows * keys];
                        let q_b = &q[first * heads * d + h * d..];
                        gemm_nt(rows, keys, d, q_b, heads * d, kf, d, &mut scores, keys);
                        for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
                            let visible = start + first + r + 1;
                            row[..visible].iter_mut().for_each(|s| *s *= scale);
                            softmax_in_place(&mut row[..visible]);
                            row[visible..].fill(0.0);
                        }
                        gemm_nn(rows, d, keys, &scores, keys, vf, d, out_b, d);
                    });
            });
    }

    for (h, out_h) in per_head.chunks_exact(n * d).enumerate() {
        for (i, o) in out_h.chunks_exact(d).enumerate() {
            out[i * heads * d + h * d..][..d].copy_from_slice(o);
        }
    }
}

fn softmax_in_place(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_shifted_sum(xs, max);
    let inv = 1.0 / sum;
    xs.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain two-loop attention, the definition the fast paths must agree with.
    fn reference(q: &[f32], heads: usize, cache: &KvCache, layer: usize) -> Vec<f32> {
        let d = cache.head_dim;
        let n = q.len() / (heads * d);
        let group = heads / cache.kv_heads;
        let mut out = vec![0f32; q.len()];
        for h in 0..heads {
            let (k, v) = cache.head(layer, h / group, cache.len() + n);
            for i in 0..n {
                let visible = cache.len() + i + 1;
                let q_i = &q[i * heads * d + h * d..][..d];
                let s: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|x| (k[j * d + x].to_f32() * q_i[x]) as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|s| (s - m).exp()).sum();
                for x in 0..d {
                    out[i * heads * d + h * d + x] = (0..visible)
                        .map(|j| (s[j] - m).exp() / z * v[j * d + x].to_f32() as f64)
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    fn filled_cache(kv_heads: usize, d: usize, past: usize, new: usize) -> KvCache {
        let mut cache = KvCache::new(1, kv_heads, d, past + new + 3);
        let rows = past + new;
        let k: Vec<f32> = (0..rows * kv_heads * d)
            .map(|i| ((i * 7919 % 113) as f32 / 56.0) - 1.0)
            .collect();
        let v: Vec<f32> = (0..rows * kv_heads * d)
            .map(|i| ((i * 104729 % 97) as f32 / 48.0) - 1.0)
            .collect();
        cache.write(0, &k, &v);
        cache.advance(past);
        cache
    }

    #[test]
    fn both_paths_match_the_definition() {
        let (heads, kv_heads, d) = (6, 2, 16);
        for (past, new) in [(0, 1), (5, 3), (0, 70), (9, 130)] {
            let cache = filled_cache(kv_heads, d, past, new);
            let q: Vec<f32> = (0..new * heads * d)
                .map(|i| ((i * 31 % 29) as f32 / 14.0) - 1.0)
                .collect();
            let mut out = vec![0f32; q.len()];
            causal_attention(&q, heads, &cache, 0, &mut out);
            let want = reference(&q, heads, &cache, 0);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "past {past} new {new}: {a} vs {b}");
            }
        }
    }
}
