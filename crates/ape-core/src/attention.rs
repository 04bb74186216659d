//! The key/value cache and the three kinds of attention ape runs over it.
//!
//! - causal attention, of a sequence over itself (sequential encoding);
//! - context attention, of each context encoded after a shared prefix over that prefix and
//!   itself, never over another context;
//! - APE attention, of the query side (the question and every generated token) over two
//!   groups of keys: the contexts, with temperature `T`, and the prefix plus the query side
//!   itself, causally. The two are merged with weights `softmax([S*T*lse_C, lse_O])`.
//!
//! Keys are stored after RoPE, as f16, head-major, so one head's keys for consecutive
//! positions are contiguous. All three run on one kernel: an online (streaming) softmax in
//! f32 over blocks of keys, which keeps for each query row its running maximum, sum and
//! weighted value sum. No score matrix larger than one block of rows by one block of keys
//! ever exists, however many contexts there are, and each result comes with its
//! log-sum-exp, which is all the APE merge needs. Every softmax is over the keys a query may
//! see and nothing else: no mask values, no padding.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::kernels::{axpy_f16, dot_f16, exp_shifted_sum, gemm_nn, gemm_nt};

/// Query rows (token and head of one KV group) handled by one task.
const ROW_BLOCK: usize = 64;

/// Keys scored together: the most scores one task holds at once is `ROW_BLOCK * KEY_BLOCK`.
const KEY_BLOCK: usize = 256;

/// Blocks with fewer live rows than this score keys one dot product at a time; the f32
/// conversion a GEMM needs costs more than it saves for so few.
const GEMM_MIN_ROWS: usize = 8;

/// The fewest keys worth a task of their own when one query's keys are split between
/// threads.
const MIN_CHUNK_KEYS: usize = 512;

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
    pub fn copy_prefix(&self, len: usize, capacity: usize) -> KvCache {
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

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

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
    /// of `head_dim`) passed through `map_key` on the way: a rotation, when the tokens move
    /// to other positions.
    pub(crate) fn append_mapped(&mut self, other: &KvCache, mut map_key: impl FnMut(&mut [f32])) {
        let (d, n) = (self.head_dim, other.len);
        assert!(self.len + n <= self.capacity, "KV cache overflow");
        let mut key = vec![0f32; d];
        for (to, from) in self.layers.iter_mut().zip(&other.layers) {
            for g in 0..self.kv_heads {
                let dst = (g * self.capacity + self.len) * d;
                let src = g * other.capacity * d;
                to.v[dst..dst + n * d].copy_from_slice(&from.v[src..src + n * d]);
                for t in 0..n {
                    from.k[src + t * d..src + (t + 1) * d].convert_to_f32_slice(&mut key);
                    map_key(&mut key);
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

    pub(crate) fn head_upto(&self, layer: usize, g: usize, upto: usize) -> (&[f16], &[f16]) {
        let l = &self.layers[layer];
        let at = g * self.capacity * self.head_dim;
        let end = at + upto * self.head_dim;
        (&l.k[at..end], &l.v[at..end])
    }

    fn spans_upto(&self, layer: usize, upto: usize) -> Vec<Vec<Span<'_>>> {
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

/// Causal attention of `n` new queries (`q`: n rows of `heads * head_dim`, after RoPE)
/// whose own keys and values are already in `cache` at positions `cache.len()..+n`.
/// Query `i` sees positions `0..=cache.len() + i`. Writes `out`, shaped like `q`.
pub fn causal_attention(q: &[f32], heads: usize, cache: &KvCache, layer: usize, out: &mut [f32]) {
    let n = q.len() / (heads * cache.head_dim);
    let job = Job {
        tokens: 0..n,
        spans: cache.spans_upto(layer, cache.len() + n),
        visible: Visible::Causal { start: cache.len() },
        score_scale: 1.0 / (cache.head_dim as f32).sqrt(),
    };
    let [done] = attend(q, heads, cache.head_dim, vec![job])
        .try_into()
        .ok()
        .unwrap();
    out.copy_from_slice(&done.out);
}

/// Attention while encoding contexts after a shared prefix, several in one batch: the
/// tokens in rows `rows` of `q` belong to the context whose keys and values `own` already
/// holds, written from its position 0. Each sees the whole `prefix` and the tokens of its
/// own context up to itself, never another context. Writes `out`, shaped like `q`.
pub fn context_attention(
    q: &[f32],
    heads: usize,
    prefix: &KvCache,
    contexts: &[(Range<usize>, &KvCache)],
    layer: usize,
    out: &mut [f32],
) {
    let d = prefix.head_dim;
    let jobs = contexts
        .iter()
        .map(|(rows, own)| Job {
            tokens: rows.clone(),
            spans: (0..prefix.kv_heads)
                .map(|g| {
                    let (pk, pv) = prefix.head(layer, g);
                    let (ok, ov) = own.head_upto(layer, g, own.len() + rows.len());
                    vec![Span { k: pk, v: pv }, Span { k: ok, v: ov }]
                })
                .collect(),
            visible: Visible::Causal {
                start: prefix.len() + own.len(),
            },
            score_scale: 1.0 / (d as f32).sqrt(),
        })
        .collect();
    let row = heads * d;
    for ((rows, _), done) in contexts.iter().zip(attend(q, heads, d, jobs)) {
        out[rows.start * row..rows.end * row].copy_from_slice(&done.out);
    }
}

/// Attention of tokens recomputed in place: the i-th token of `q` sits at position
/// `positions[i]` (increasing, all filled) of `cache`, whose row there already holds the
/// token's new keys and values, and sees every position up to its own: the other rows
/// keep whatever they hold. Writes `out`, shaped like `q`.
pub(crate) fn in_place_attention(
    q: &[f32],
    heads: usize,
    cache: &KvCache,
    positions: &[usize],
    layer: usize,
    out: &mut [f32],
) {
    let upto: Vec<usize> = positions.iter().map(|p| p + 1).collect();
    let job = Job {
        tokens: 0..positions.len(),
        spans: cache.spans_upto(layer, upto.last().copied().unwrap_or(0)),
        visible: Visible::Upto(upto),
        score_scale: 1.0 / (cache.head_dim as f32).sqrt(),
    };
    let [done] = attend(q, heads, cache.head_dim, vec![job])
        .try_into()
        .ok()
        .unwrap();
    out.copy_from_slice(&done.out);
}

/// APE's temperature and scale, applied to the query side's attention over contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApeFactors {
    pub temperature: f32,
    pub scale: f32,
}

/// APE attention of `n` query-side tokens whose own keys and values are already in `cache`
/// (after the prefix) at positions `cache.len()..+n`.
///
/// Each query attends causally to `cache` (group O: the prefix and the query side so far)
/// and to every token of every context (group C) with its scores divided by the
/// temperature; the two results are merged with weights `softmax([S*T*lse_C, lse_O])`. With
/// `T = S = 1` this is exactly one softmax over both groups. Writes `out`, shaped like `q`.
pub fn ape_attention(
    q: &[f32],
    heads: usize,
    cache: &KvCache,
    contexts: &[&KvCache],
    factors: ApeFactors,
    layer: usize,
    out: &mut [f32],
) {
    let d = cache.head_dim;
    let n = q.len() / (heads * d);
    let score_scale = 1.0 / (d as f32).sqrt();
    let own = Job {
        tokens: 0..n,
        spans: cache.spans_upto(layer, cache.len() + n),
        visible: Visible::Causal { start: cache.len() },
        score_scale,
    };
    let in_contexts = Job {
        tokens: 0..n,
        spans: (0..cache.kv_heads)
            .map(|g| {
                contexts
                    .iter()
                    .map(|c| {
                        let (k, v) = c.head(layer, g);
                        Span { k, v }
                    })
                    .collect()
            })
            .collect(),
        visible: Visible::All,
        score_scale: score_scale / factors.temperature,
    };
    let [o, c] = attend(q, heads, d, vec![own, in_contexts])
        .try_into()
        .ok()
        .unwrap();
    let context_weight = factors.scale * factors.temperature;
    for (r, out_r) in out.chunks_exact_mut(d).enumerate() {
        let (lse_c, lse_o) = (context_weight * c.lse[r], o.lse[r]);
        let max = lse_c.max(lse_o);
        let (wc, wo) = ((lse_c - max).exp(), (lse_o - max).exp());
        let (wc, wo) = (wc / (wc + wo), wo / (wc + wo));
        let (oc, oo) = (&c.out[r * d..(r + 1) * d], &o.out[r * d..(r + 1) * d]);
        for ((x, a), b) in out_r.iter_mut().zip(oc).zip(oo) {
            *x = wc * a + wo * b;
        }
    }
}

/// One KV head's keys and values for consecutive positions: rows of `head_dim`.
#[derive(Clone, Copy)]
struct Span<'a> {
    k: &'a [f16],
    v: &'a [f16],
}

impl<'a> Span<'a> {
    fn rows(&self, d: usize) -> usize {
        self.k.len() / d
    }

    fn slice(&self, d: usize, rows: Range<usize>) -> Span<'a> {
        let range = rows.start * d..rows.end * d;
        Span {
            k: &self.k[range.clone()],
            v: &self.v[range],
        }
    }
}

/// The queries of some tokens of a batch over one set of keys.
struct Job<'a> {
    /// The tokens (rows of `q`) whose queries attend.
    tokens: Range<usize>,
    /// For each KV head, its keys in position order, as spans.
    spans: Vec<Vec<Span<'a>>>,
    /// Which keys each token sees.
    visible: Visible,
    /// Factor applied to `q . k` before the softmax.
    score_scale: f32,
}

/// The keys a job's tokens see, always a first run of its keys.
enum Visible {
    /// Every key.
    All,
    /// The i-th token sees the first `start + i + 1` keys.
    Causal { start: usize },
    /// The i-th token sees the first `upto[i]` keys; the counts never decrease.
    Upto(Vec<usize>),
}

impl Visible {
    fn keys_seen_by(&self, token: usize) -> usize {
        match self {
            Visible::All => usize::MAX,
            Visible::Causal { start } => start + token + 1,
            Visible::Upto(upto) => upto[token],
        }
    }
}

/// A job's normalised outputs (tokens x heads x head_dim) and the log-sum-exp of each
/// (token, head)'s scaled scores (`-inf` when it saw no key).
struct Attended {
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// A piece of work: one row block of one job's KV group, over one chunk of its keys.
struct Task<'a> {
    job: usize,
    group: usize,
    rows: Range<usize>,
    first_key: usize,
    spans: Vec<Span<'a>>,
}

/// Run the jobs: every (job, KV head, block of query rows, chunk of keys) is one task for
/// the thread pool; chunks of the same rows are merged afterwards. Rows of KV head `g` are
/// its query heads for each token in turn, so one pass over a block of keys serves them
/// all (grouped-query attention reads each key once per row block, not once per head).
fn attend(q: &[f32], heads: usize, d: usize, jobs: Vec<Job<'_>>) -> Vec<Attended> {
    let Some(kv_heads) = jobs.first().map(|j| j.spans.len()) else {
        return Vec::new();
    };
    let group = heads / kv_heads;
    let threads = rayon::current_num_threads();
    let mut tasks = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let rows = job.tokens.len() * group;
        let blocks = rows.div_ceil(ROW_BLOCK);
        for (g, spans) in job.spans.iter().enumerate() {
            let keys: usize = spans.iter().map(|s| s.rows(d)).sum();
            // Split the keys only when the row blocks alone leave threads idle, as in
            // decoding; the split depends on nothing but this job, so a job's result does
            // not change with the company it keeps in a batch.
            let parallel = blocks * kv_heads;
            let chunks = if parallel >= 2 * threads {
                1
            } else {
                (2 * threads)
                    .div_ceil(parallel)
                    .min(keys / MIN_CHUNK_KEYS)
                    .max(1)
            };
            let pieces = split_keys(spans, d, chunks);
            for b in 0..blocks {
                let rows = b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(rows);
                for (first_key, spans) in &pieces {
                    tasks.push(Task {
                        job: j,
                        group: g,
                        rows: rows.clone(),
                        first_key: *first_key,
                        spans: spans.clone(),
                    });
                }
            }
        }
    }

    let partials: Vec<OnlineSoftmax> = tasks
        .par_iter()
        .map(|task| run_task(q, heads, d, group, &jobs[task.job], task))
        .collect();

    let mut results: Vec<Attended> = jobs
        .iter()
        .map(|job| Attended {
            out: vec![0.0; job.tokens.len() * heads * d],
            lse: vec![f32::NEG_INFINITY; job.tokens.len() * heads],
        })
        .collect();
    let mut i = 0;
    while i < tasks.len() {
        let mut state = partials[i].clone();
        let mut next = i + 1;
        while next < tasks.len()
            && (tasks[next].job, tasks[next].group, tasks[next].rows.start)
                == (tasks[i].job, tasks[i].group, tasks[i].rows.start)
        {
            state.merge(&partials[next]);
            next += 1;
        }
        let task = &tasks[i];
        let result = &mut results[task.job];
        for (local, r) in task.rows.clone().enumerate() {
            let (t, h) = (r / group, task.group * group + r % group);
            let at = t * heads + h;
            result.lse[at] = state.finish(local, &mut result.out[at * d..(at + 1) * d]);
        }
        i = next;
    }
    results
}

/// Cut a head's spans into `parts` runs of about equal key counts, each with the index of
/// its first key; always at least one run, so that rows with no keys still get a result.
fn split_keys<'a>(spans: &[Span<'a>], d: usize, parts: usize) -> Vec<(usize, Vec<Span<'a>>)> {
    let total: usize = spans.iter().map(|s| s.rows(d)).sum();
    let per_part = total.div_ceil(parts).max(1);
    let mut pieces = vec![(0, Vec::new())];
    let mut filled = 0;
    let mut key = 0;
    for span in spans {
        let mut at = 0;
        while at < span.rows(d) {
            if filled == per_part {
                pieces.push((key, Vec::new()));
                filled = 0;
            }
            let take = (per_part - filled).min(span.rows(d) - at);
            pieces
                .last_mut()
                .unwrap()
                .1
                .push(span.slice(d, at..at + take));
            at += take;
            filled += take;
            key += take;
        }
    }
    pieces
}

fn run_task(
    q: &[f32],
    heads: usize,
    d: usize,
    group: usize,
    job: &Job<'_>,
    task: &Task<'_>,
) -> OnlineSoftmax {
    let rows = task.rows.len();
    let mut queries = vec![0f32; rows * d];
    for (local, r) in task.rows.clone().enumerate() {
        let t = job.tokens.start + r / group;
        let h = task.group * group + r % group;
        let from = &q[t * heads * d + h * d..][..d];
        for (x, y) in queries[local * d..(local + 1) * d].iter_mut().zip(from) {
            *x = y * job.score_scale;
        }
    }
    let visible = |local: usize| job.visible.keys_seen_by((task.rows.start + local) / group);
    let mut state = OnlineSoftmax::new(rows, d);
    let mut scratch = Scratch::default();
    let mut key = task.first_key;
    for span in &task.spans {
        let len = span.rows(d);
        for at in (0..len).step_by(KEY_BLOCK) {
            let block = span.slice(d, at..(at + KEY_BLOCK).min(len));
            let first = key + at;
            let seen = |local: usize| visible(local).saturating_sub(first).min(block.rows(d));
            state.absorb(&queries, &seen, block, &mut scratch);
        }
        key += len;
    }
    state
}

/// Buffers a task reuses from one key block to the next.
#[derive(Default)]
struct Scratch {
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
}

/// The running state of a softmax-weighted sum for some query rows: per row the largest
/// score so far, the sum of `exp(score - max)` and the sum of those weights times values.
#[derive(Clone)]
struct OnlineSoftmax {
    d: usize,
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

impl OnlineSoftmax {
    fn new(rows: usize, d: usize) -> Self {
        OnlineSoftmax {
            d,
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            acc: vec![0.0; rows * d],
        }
    }

    /// Take in one block of keys: row `r` of `queries` (already scaled) sees the first
    /// `seen(r)` of them, a count that never decreases with `r`.
    fn absorb(
        &mut self,
        queries: &[f32],
        seen: &dyn Fn(usize) -> usize,
        block: Span<'_>,
        scratch: &mut Scratch,
    ) {
        let d = self.d;
        let rows = self.max.len();
        let first = (0..rows).find(|&r| seen(r) > 0).unwrap_or(rows);
        let live = rows - first;
        if live == 0 {
            return;
        }
        let keys = block.rows(d);
        if live < GEMM_MIN_ROWS {
            for r in first..rows {
                let scores = &mut scratch.scores;
                scores.clear();
                let q_r = &queries[r * d..(r + 1) * d];
                scores.extend(
                    block.k[..seen(r) * d]
                        .chunks_exact(d)
                        .map(|k| dot_f16(k, q_r)),
                );
                let acc = &mut self.acc[r * d..(r + 1) * d];
                let rescale = update_row(&mut self.max[r], &mut self.sum[r], scores);
                acc.iter_mut().for_each(|a| *a *= rescale);
                for (&p, v) in scores.iter().zip(block.v.chunks_exact(d)) {
                    axpy_f16(acc, p, v);
                }
            }
            return;
        }

        scratch.keys.resize(keys * d, 0.0);
        scratch.values.resize(keys * d, 0.0);
        scratch.scores.resize(live * keys, 0.0);
        block.k.convert_to_f32_slice(&mut scratch.keys);
        block.v.convert_to_f32_slice(&mut scratch.values);
        let scores = &mut scratch.scores;
        gemm_nt(
            live,
            keys,
            d,
            &queries[first * d..],
            d,
            &scratch.keys,
            d,
            scores,
            keys,
        );
        for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
            let r = first + i;
            let n = seen(r);
            let rescale = update_row(&mut self.max[r], &mut self.sum[r], &mut row[..n]);
            row[n..].fill(0.0);
            self.acc[r * d..(r + 1) * d]
                .iter_mut()
                .for_each(|a| *a *= rescale);
        }
        gemm_nn(
            live,
            d,
            keys,
            scores,
            keys,
            &scratch.values,
            d,
            &mut self.acc[first * d..],
            d,
        );
    }

    /// Fold the other state (the same rows over other keys) into this one.
    fn merge(&mut self, other: &OnlineSoftmax) {
        let d = self.d;
        for r in 0..self.max.len() {
            let max = self.max[r].max(other.max[r]);
            if max == f32::NEG_INFINITY {
                continue;
            }
            let (a, b) = ((self.max[r] - max).exp(), (other.max[r] - max).exp());
            self.max[r] = max;
            self.sum[r] = self.sum[r] * a + other.sum[r] * b;
            for (x, y) in self.acc[r * d..(r + 1) * d]
                .iter_mut()
                .zip(&other.acc[r * d..(r + 1) * d])
            {
                *x = *x * a + y * b;
            }
        }
    }

    /// Write row `r`'s normalised output and return its log-sum-exp.
    fn finish(&self, r: usize, out: &mut [f32]) -> f32 {
        if self.sum[r] == 0.0 {
            out.fill(0.0);
            return f32::NEG_INFINITY;
        }
        let inv = 1.0 / self.sum[r];
        for (o, a) in out.iter_mut().zip(&self.acc[r * self.d..]) {
            *o = a * inv;
        }
        self.max[r] + self.sum[r].ln()
    }
}

/// Turn one row's new scores into weights relative to its updated maximum, add them to its
/// sum, and return the factor its earlier weighted values must be multiplied by.
fn update_row(max: &mut f32, sum: &mut f32, scores: &mut [f32]) -> f32 {
    let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let new_max = max.max(block_max);
    let rescale = (*max - new_max).exp();
    *sum = *sum * rescale + exp_shifted_sum(scores, new_max);
    *max = new_max;
    rescale
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Scores of one query against some keys, in f64, with the model's 1/sqrt(d).
    fn scores(q: &[f32], keys: &[f16], d: usize) -> Vec<f64> {
        keys.chunks_exact(d)
            .map(|k| {
                k.iter()
                    .zip(q)
                    .map(|(k, q)| k.to_f64() * *q as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect()
    }

    fn log_sum_exp(s: &[f64]) -> f64 {
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return m;
        }
        m + s.iter().map(|s| (s - m).exp()).sum::<f64>().ln()
    }

    fn weighted_values(weights: &[f64], values: &[f16], d: usize) -> Vec<f64> {
        let mut out = vec![0f64; d];
        for (w, v) in weights.iter().zip(values.chunks_exact(d)) {
            for (o, v) in out.iter_mut().zip(v) {
                *o += w * v.to_f64();
            }
        }
        out
    }

    /// APE as written in the specification, densely in f64: for each query row, the
    /// context scores over T, both groups' softmaxes and the merge of their log-sum-exps.
    /// With no contexts it is plain causal attention.
    fn dense_reference(
        q: &[f32],
        heads: usize,
        cache: &KvCache,
        contexts: &[&KvCache],
        factors: ApeFactors,
    ) -> Vec<f32> {
        let d = cache.head_dim;
        let n = q.len() / (heads * d);
        let group = heads / cache.kv_heads;
        let (t, s) = (factors.temperature as f64, factors.scale as f64);
        let mut out = vec![0f32; q.len()];
        for i in 0..n {
            for h in 0..heads {
                let g = h / group;
                let q_i = &q[(i * heads + h) * d..][..d];
                let visible = cache.len() + i + 1;
                let (k, v) = cache.head_upto(0, g, visible);
                let own = scores(q_i, k, d);
                let lse_o = log_sum_exp(&own);
                let o_o = weighted_values(
                    &own.iter().map(|s| (s - lse_o).exp()).collect::<Vec<_>>(),
                    v,
                    d,
                );
                let mut ctx_scores = Vec::new();
                let mut ctx_values = Vec::new();
                for c in contexts {
                    let (k, v) = c.head(0, g);
                    ctx_scores.extend(scores(q_i, k, d).into_iter().map(|s| s / t));
                    ctx_values.extend_from_slice(v);
                }
                let lse_c = log_sum_exp(&ctx_scores);
                let o_c = weighted_values(
                    &ctx_scores
                        .iter()
                        .map(|s| (s - lse_c).exp())
                        .collect::<Vec<_>>(),
                    &ctx_values,
                    d,
                );
                let (a, b) = (s * t * lse_c, lse_o);
                let m = a.max(b);
                let (wc, wo) = ((a - m).exp(), (b - m).exp());
                for x in 0..d {
                    let mixed = if ctx_scores.is_empty() {
                        o_o[x]
                    } else {
                        (wc * o_c[x] + wo * o_o[x]) / (wc + wo)
                    };
                    out[(i * heads + h) * d + x] = mixed as f32;
                }
            }
        }
        out
    }

    /// Values in [-1, 1) from a seed, deterministic.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A one-layer cache whose first `filled` positions are set, with room for `extra`
    /// more already written (as a forward pass writes the new tokens' keys first).
    fn cache_with(kv_heads: usize, d: usize, filled: usize, extra: usize, seed: u64) -> KvCache {
        let mut cache = KvCache::new(1, kv_heads, d, filled + extra);
        let rows = (filled + extra) * kv_heads * d;
        // Keys spread wider than values so that the softmaxes are far from uniform.
        let k: Vec<f32> = values(rows, seed).iter().map(|x| x * 3.0).collect();
        cache.write(0, &k, &values(rows, seed + 1));
        cache.advance(filled);
        cache
    }

    fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tolerance,
                "{what}: element {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn causal_attention_matches_the_definition_on_both_paths() {
        let (heads, kv_heads, d) = (6, 2, 16);
        for (past, new) in [(0, 1), (5, 3), (0, 70), (9, 130), (600, 2), (1500, 1)] {
            let cache = cache_with(kv_heads, d, past, new, 7);
            let q = values(new * heads * d, 11);
            let mut out = vec![0f32; q.len()];
            causal_attention(&q, heads, &cache, 0, &mut out);
            let factors = ApeFactors {
                temperature: 1.0,
                scale: 1.0,
            };
            let want = dense_reference(&q, heads, &cache, &[], factors);
            assert_close(&out, &want, 1e-5, &format!("past {past} new {new}"));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn ape_merge_matches_the_dense_formula(
            kv_heads in 1usize..3,
            group in 1usize..4,
            d in prop::sample::select(vec![8usize, 16, 64]),
            prefix in 0usize..6,
            new in 1usize..24,
            lengths in prop::collection::vec(0usize..300, 0..5),
            temperature in 0.3f32..1.5,
            scale in 0.3f32..1.5,
            seed in 0u64..1000,
        ) {
            let heads = kv_heads * group;
            let cache = cache_with(kv_heads, d, prefix, new, seed);
            let contexts: Vec<KvCache> = lengths
                .iter()
                .enumerate()
                .map(|(i, &len)| cache_with(kv_heads, d, len, 0, seed + 10 * i as u64 + 5))
                .collect();
            let refs: Vec<&KvCache> = contexts.iter().collect();
            let q = values(new * heads * d, seed + 3);
            let factors = ApeFactors { temperature, scale };
            let mut out = vec![0f32; q.len()];
            ape_attention(&q, heads, &cache, &refs, factors, 0, &mut out);
            let want = dense_reference(&q, heads, &cache, &refs, factors);
            for (a, b) in out.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-5, "{} vs {}", a, b);
            }
        }
    }

    #[test]
    fn ape_with_unit_factors_is_one_softmax_over_both_groups() {
        let (heads, kv_heads, d) = (4, 2, 16);
        let (prefix, lens, new) = (3, [40, 7, 90], 5);
        let contexts: Vec<KvCache> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| cache_with(kv_heads, d, l, 0, 100 + i as u64))
            .collect();
        let cache = cache_with(kv_heads, d, prefix, new, 1);
        let q = values(new * heads * d, 2);
        let refs: Vec<&KvCache> = contexts.iter().collect();
        let mut ape = vec![0f32; q.len()];
        let unit = ApeFactors {
            temperature: 1.0,
            scale: 1.0,
        };
        ape_attention(&q, heads, &cache, &refs, unit, 0, &mut ape);

        // The same keys laid out as one sequence: prefix, the contexts, then the queries,
        // with the queries seeing everything before them.
        let total = prefix + lens.iter().sum::<usize>();
        let mut joined = KvCache::new(1, kv_heads, d, total + new);
        let mut rows_k = Vec::new();
        let mut rows_v = Vec::new();
        let mut push = |c: &KvCache, upto: usize, from: usize| {
            for p in from..upto {
                for g in 0..kv_heads {
                    let (k, v) = c.head_upto(0, g, upto);
                    rows_k.extend(k[p * d..(p + 1) * d].iter().map(|x| x.to_f32()));
                    rows_v.extend(v[p * d..(p + 1) * d].iter().map(|x| x.to_f32()));
                }
            }
        };
        push(&cache, prefix, 0);
        for c in &contexts {
            push(c, c.len(), 0);
        }
        push(&cache, prefix + new, prefix);
        joined.write(0, &rows_k, &rows_v);
        joined.advance(total);
        let mut sequential = vec![0f32; q.len()];
        causal_attention(&q, heads, &joined, 0, &mut sequential);
        assert_close(&ape, &sequential, 1e-5, "unit-factor APE vs one softmax");
    }

    #[test]
    fn a_context_in_a_batch_is_attended_exactly_as_alone() {
        let (heads, kv_heads, d) = (6, 2, 32);
        let prefix = cache_with(kv_heads, d, 9, 0, 1);
        let lens = [70usize, 3, 200];
        let owns: Vec<KvCache> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let mut c = cache_with(kv_heads, d, 0, l, 20 + i as u64);
                c.truncate(0);
                c
            })
            .collect();
        let total: usize = lens.iter().sum();
        let q = values(total * heads * d, 3);
        let mut ranges = Vec::new();
        let mut at = 0;
        for &l in &lens {
            ranges.push(at..at + l);
            at += l;
        }
        let batch: Vec<(Range<usize>, &KvCache)> =
            ranges.iter().cloned().zip(owns.iter()).collect();
        let mut together = vec![0f32; q.len()];
        context_attention(&q, heads, &prefix, &batch, 0, &mut together);
        let row = heads * d;
        for (range, own) in ranges.iter().zip(&owns) {
            let q_alone = &q[range.start * row..range.end * row];
            let mut alone = vec![0f32; q_alone.len()];
            context_attention(
                q_alone,
                heads,
                &prefix,
                &[(0..range.len(), own)],
                0,
                &mut alone,
            );
            assert_eq!(alone, &together[range.start * row..range.end * row]);

            // And it is ordinary causal attention over prefix + context.
            let mut joined = prefix.copy_with_capacity(prefix.len() + range.len());
            let mut k = Vec::new();
            let mut v = Vec::new();
            for p in 0..range.len() {
                for g in 0..kv_heads {
                    let (ok, ov) = own.head_upto(0, g, range.len());
                    k.extend(ok[p * d..(p + 1) * d].iter().map(|x| x.to_f32()));
                    v.extend(ov[p * d..(p + 1) * d].iter().map(|x| x.to_f32()));
                }
            }
            joined.write(0, &k, &v);
            let mut causal = vec![0f32; q_alone.len()];
            causal_attention(q_alone, heads, &joined, 0, &mut causal);
            assert_close(&alone, &causal, 1e-5, "context attention vs causal");
        }
    }
}
