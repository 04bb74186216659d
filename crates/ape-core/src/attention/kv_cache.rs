//! The key/value cache: one run of positions' keys (after RoPE) and values, as f16,
//! head-major, so one head's keys for consecutive positions are contiguous.

use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use rayon::prelude::*;

use super::attend::Span;
use crate::kernels::dense::widen;

/// Keys and values of one layer for up to `capacity` positions.
#[derive(Clone)]
struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
}

/// The keys and values of a whole model for one run of positions: a sequence being
/// generated, a shared prefix, or one encoded context.
#[derive(Clone)]
pub struct KvCache {
    /// Key/value heads per layer (fewer than the query heads under grouped-query
    /// attention).
    pub kv_heads: usize,
    /// Values per head and position, in keys and in values alike.
    pub head_dim: usize,
    capacity: usize,
    len: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache of `layers` layers with room for `capacity` positions, zeroed.
    /// The zeros are asked of the allocator as such (zeroed integers), so the room no
    /// position is written to is never touched and takes no memory: a request's cache has
    /// room for its longest answer, which most answers stop short of.
    pub(crate) fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let size = kv_heads * capacity * head_dim;
        let zeros = || -> Vec<f16> { vec![0u16; size].reinterpret_into() };
        KvCache {
            kv_heads,
            head_dim,
            capacity,
            len: 0,
            layers: (0..layers)
                .map(|_| LayerKv {
                    k: zeros(),
                    v: zeros(),
                })
                .collect(),
        }
    }

    /// A cache of exactly `len` filled positions whose keys and values `fill(layer, g, k,
    /// v)` writes, head by head (`len * head_dim` values each), as [`KvCache::head`] returns
    /// them; the first error `fill` returns is returned.
    pub fn from_fn<E>(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        len: usize,
        mut fill: impl FnMut(usize, usize, &mut [f16], &mut [f16]) -> std::result::Result<(), E>,
    ) -> std::result::Result<KvCache, E> {
        let mut cache = KvCache::new(layers, kv_heads, head_dim, len);
        // An empty cache has no heads to fill (and `chunks_exact_mut` needs a non-zero size).
        let per_head = (len * head_dim).max(1);
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            for (g, (k, v)) in layer
                .k
                .chunks_exact_mut(per_head)
                .zip(layer.v.chunks_exact_mut(per_head))
                .enumerate()
            {
                fill(l, g, k, v)?;
            }
        }
        cache.len = len;
        Ok(cache)
    }

    /// A copy of this cache's filled positions with room for `capacity` in all.
    pub fn copy_with_capacity(&self, capacity: usize) -> KvCache {
        self.copy_prefix(self.len, capacity)
    }

    /// A copy of the first `len` filled positions with room for `capacity` in all.
    pub(crate) fn copy_prefix(&self, len: usize, capacity: usize) -> KvCache {
        assert!(len <= self.len && capacity >= len);
        let mut copy = KvCache::new(self.layers.len(), self.kv_heads, self.head_dim, capacity);
        copy.len = len;
        let n = len * self.head_dim;
        for (to, from) in copy.layers.iter_mut().zip(&self.layers) {
            for g in 0..self.kv_heads {
                let (src, dst) = (
                    g * self.capacity * self.head_dim,
                    g * capacity * self.head_dim,
                );
                to.k[dst..dst + n].copy_from_slice(&from.k[src..src + n]);
                to.v[dst..dst + n].copy_from_slice(&from.v[src..src + n]);
            }
        }
        copy
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is filled yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache has room for, filled or not; it never grows past them.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Layers the cache holds keys and values for: the model's.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
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

    /// Overwrite the keys and values at `positions` (filled ones) of `layer` with `k` and
    /// `v`, one row of `kv_heads * head_dim` per position.
    pub(crate) fn overwrite(&mut self, layer: usize, positions: &[usize], k: &[f32], v: &[f32]) {
        let (d, row) = (self.head_dim, self.kv_heads * self.head_dim);
        let layer = &mut self.layers[layer];
        for (t, &p) in positions.iter().enumerate() {
            assert!(p < self.len, "overwriting an unfilled position");
            for g in 0..self.kv_heads {
                let at = (g * self.capacity + p) * d;
                let from = t * row + g * d;
                layer.k[at..at + d].convert_from_f32_slice(&k[from..from + d]);
                layer.v[at..at + d].convert_from_f32_slice(&v[from..from + d]);
            }
        }
    }

    /// Append the filled positions of `other` after this cache's, each key (one head's row
    /// of `head_dim`) passed through `map_key(layer, key)` on the way: a rotation, when the
    /// tokens move to other positions.
    pub(crate) fn append_mapped(
        &mut self,
        other: &KvCache,
        mut map_key: impl FnMut(usize, &mut [f32]),
    ) {
        let (d, n) = (self.head_dim, other.len);
        assert!(self.len + n <= self.capacity, "KV cache overflow");
        let mut key = vec![0f32; d];
        for (layer, (to, from)) in self.layers.iter_mut().zip(&other.layers).enumerate() {
            for g in 0..self.kv_heads {
                let dst = (g * self.capacity + self.len) * d;
                let src = g * other.capacity * d;
                to.v[dst..dst + n * d].copy_from_slice(&from.v[src..src + n * d]);
                for t in 0..n {
                    widen(&from.k[src + t * d..src + (t + 1) * d], &mut key);
                    map_key(layer, &mut key);
                    to.k[dst + t * d..dst + (t + 1) * d].convert_from_f32_slice(&key);
                }
            }
        }
        self.len += n;
    }

    /// A cache of the filled positions `rows` (in that order), with room for `capacity`.
    pub(crate) fn gather(&self, rows: &[usize], capacity: usize) -> KvCache {
        assert!(capacity >= rows.len());
        let d = self.head_dim;
        let mut out = KvCache::new(self.layers.len(), self.kv_heads, d, capacity);
        for (to, from) in out.layers.iter_mut().zip(&self.layers) {
            for g in 0..self.kv_heads {
                for (t, &r) in rows.iter().enumerate() {
                    assert!(r < self.len, "gathering an unfilled position");
                    let (dst, src) = ((g * capacity + t) * d, (g * self.capacity + r) * d);
                    to.k[dst..dst + d].copy_from_slice(&from.k[src..src + d]);
                    to.v[dst..dst + d].copy_from_slice(&from.v[src..src + d]);
                }
            }
        }
        out.len = rows.len();
        out
    }

    /// Keys and values of KV head `g` in `layer` for the filled positions: `len` rows of
    /// `head_dim` each.
    pub fn head(&self, layer: usize, g: usize) -> (&[f16], &[f16]) {
        self.head_upto(layer, g, self.len)
    }

    /// Every (layer, KV head)'s keys and values for the filled positions, as
    /// [`KvCache::head`] gives them, to change in place, in parallel.
    pub(crate) fn heads_mut(
        &mut self,
    ) -> impl ParallelIterator<Item = (usize, usize, &mut [f16], &mut [f16])> {
        let (span, filled) = (self.capacity * self.head_dim, self.len * self.head_dim);
        self.layers
            .par_iter_mut()
            .enumerate()
            .flat_map_iter(move |(layer, l)| {
                let heads = l.k.chunks_mut(span).zip(l.v.chunks_mut(span));
                heads
                    .enumerate()
                    .map(move |(g, (k, v))| (layer, g, &mut k[..filled], &mut v[..filled]))
            })
    }

    pub(crate) fn head_upto(&self, layer: usize, g: usize, upto: usize) -> (&[f16], &[f16]) {
        let l = &self.layers[layer];
        let at = g * self.capacity * self.head_dim;
        let end = at + upto * self.head_dim;
        (&l.k[at..end], &l.v[at..end])
    }

    pub(super) fn spans_upto(&self, layer: usize, upto: usize) -> Vec<Vec<Span<'_>>> {
        (0..self.kv_heads)
            .map(|g| {
                let (k, v) = self.head_upto(layer, g, upto);
                vec![Span { k, v }]
            })
            .collect()
    }

    /// Bytes allocated for keys and values.
    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.kv_heads * self.capacity * self.head_dim * 2
    }
}
