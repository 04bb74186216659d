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

/// Query rows one task holds, one per vector lane.
const LANES: usize = 16;

/// Keys whose weights and weighted values are summed as one partial sum: the partial sums
/// are added in key order, so how keys are split between tasks never changes a result.
const CHUNK: usize = 256;

/// The fewest keys worth a task of their own when one block of rows' keys are split
/// between threads.
const MIN_SPLIT_KEYS: usize = 512;

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

impl ApeFactors {
    /// `T = S = 1`: one softmax over the prefix, the contexts and the query side.
    pub const ONE_SOFTMAX: ApeFactors = ApeFactors {
        temperature: 1.0,
        scale: 1.0,
    };
}

/// APE attention of `n` query-side tokens whose own keys and values are already in `cache`
/// at positions `cache.len()..+n`, after the shared prefix (its first `prefix_len`
/// positions) and the query side so far.
///
/// Each query attends causally to `cache` (group O: the prefix and the query side so far)
/// and to every token of every context (group C) with its scores divided by the
/// temperature; the two results are merged with weights `softmax([S*T*lse_C, lse_O])`. With
/// `T = S = 1` this is exactly one softmax over both groups, and it is computed as one:
/// over the prefix, the contexts in order and the query side, the keys sequential reading
/// has in its cache, so that one context read this way is sequential reading to the bit.
/// Writes `out`, shaped like `q`.
#[allow(clippy::too_many_arguments)]
pub fn ape_attention(
    q: &[f32],
    heads: usize,
    cache: &KvCache,
    prefix_len: usize,
    contexts: &[&KvCache],
    factors: ApeFactors,
    layer: usize,
    out: &mut [f32],
) {
    let d = cache.head_dim;
    let n = q.len() / (heads * d);
    let score_scale = 1.0 / (d as f32).sqrt();
    let context_spans = |g: usize| {
        contexts.iter().map(move |c| {
            let (k, v) = c.head(layer, g);
            Span { k, v }
        })
    };
    if factors == ApeFactors::ONE_SOFTMAX {
        let in_order = Job {
            tokens: 0..n,
            spans: (0..cache.kv_heads)
                .map(|g| {
                    let (k, v) = cache.head_upto(layer, g, cache.len() + n);
                    let at = prefix_len * d;
                    let mut spans = vec![Span {
                        k: &k[..at],
                        v: &v[..at],
                    }];
                    spans.extend(context_spans(g));
                    spans.push(Span {
                        k: &k[at..],
                        v: &v[at..],
                    });
                    spans
                })
                .collect(),
            visible: Visible::Causal {
                start: cache.len() + contexts.iter().map(|c| c.len()).sum::<usize>(),
            },
            score_scale,
        };
        let [done] = attend(q, heads, d, vec![in_order]).try_into().ok().unwrap();
        out.copy_from_slice(&done.out);
        return;
    }
    let own = Job {
        tokens: 0..n,
        spans: cache.spans_upto(layer, cache.len() + n),
        visible: Visible::Causal { start: cache.len() },
        score_scale,
    };
    let in_contexts = Job {
        tokens: 0..n,
        spans: (0..cache.kv_heads)
            .map(|g| context_spans(g).collect())
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

/// A piece of work: up to [`LANES`] query rows of one job's KV group over a run of its keys
/// (all of them, or one of several runs when the rows alone leave threads idle).
struct Task<'a> {
    job: usize,
    group: usize,
    /// Rows of the group: row `r` is token `r / group_size` of the job, head `r % group_size`
    /// of the group.
    rows: Range<usize>,
    /// Indices into the job's key sequence; a run starts on a [`CHUNK`] boundary.
    keys: Range<usize>,
    /// Whether `keys` are all the keys the rows see.
    whole: bool,
    spans: &'a [Span<'a>],
}

/// One query row per lane.
type Lanes = [f32; LANES];

/// A task's rows, transposed into lanes: `q[i][l]` is element `i` of row `l`'s scaled
/// query, and row `l` sees the first `seen[l]` keys of the job.
struct RowLanes {
    q: Vec<Lanes>,
    seen: [usize; LANES],
}

/// The weighted sums of some rows over one [`CHUNK`] of keys, all relative to the rows'
/// maximum score over every key they see.
struct ChunkSums {
    sum: Lanes,
    /// `acc[i][l]`: element `i` of row `l`'s weighted value sum.
    acc: Vec<Lanes>,
}

/// Where a task stands after scoring: done, or waiting for the maximum over its rows'
/// other runs of keys.
enum Scored {
    Whole { max: Lanes, sums: ChunkSums },
    Part { max: Lanes, scores: Vec<Lanes> },
}

/// Run the jobs. Each (job, KV group, block of up to [`LANES`] query rows) is one task for
/// the thread pool, or several over runs of its keys when there are too few blocks to keep
/// the threads busy (as in decoding); runs are joined afterwards.
///
/// A row's result is computed by the same arithmetic whatever the batch around it and
/// however its keys are split: every score is one chain of multiply-adds over the head's
/// elements, the softmax is taken against the row's maximum over all the keys it sees (an
/// exact, order-free quantity), and weights and weighted values are summed per chunk of
/// [`CHUNK`] keys in key order, the chunks then added in key order. Keys a row does not see
/// contribute exact zeros.
fn attend(q: &[f32], heads: usize, d: usize, jobs: Vec<Job<'_>>) -> Vec<Attended> {
    let Some(kv_heads) = jobs.first().map(|j| j.spans.len()) else {
        return Vec::new();
    };
    let group_size = heads / kv_heads;
    let threads = rayon::current_num_threads();
    let units: usize = jobs
        .iter()
        .map(|j| (j.tokens.len() * group_size).div_ceil(LANES) * kv_heads)
        .sum();
    let mut tasks = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let rows = job.tokens.len() * group_size;
        for (g, spans) in job.spans.iter().enumerate() {
            let total: usize = spans.iter().map(|s| s.rows(d)).sum();
            for start in (0..rows).step_by(LANES) {
                let block = start..(start + LANES).min(rows);
                let last_token = (block.end - 1) / group_size;
                let seen = job.visible.keys_seen_by(last_token).min(total);
                let runs = if units >= 2 * threads {
                    1
                } else {
                    (2 * threads)
                        .div_ceil(units)
                        .min(seen / MIN_SPLIT_KEYS)
                        .max(1)
                };
                let per_run = seen.div_ceil(runs).next_multiple_of(CHUNK).max(CHUNK);
                let mut first = 0;
                loop {
                    let keys = first..(first + per_run).min(seen);
                    tasks.push(Task {
                        job: j,
                        group: g,
                        rows: block.clone(),
                        whole: keys.start == 0 && keys.end == seen,
                        keys,
                        spans,
                    });
                    first += per_run;
                    if first >= seen {
                        break;
                    }
                }
            }
        }
    }

    let lanes: Vec<RowLanes> = tasks
        .iter()
        .map(|t| row_lanes(q, heads, d, group_size, &jobs[t.job], t))
        .collect();
    let scored: Vec<Scored> = tasks
        .par_iter()
        .zip(&lanes)
        .map(|(task, rows)| score_task(d, task, rows))
        .collect();

    // Runs of one block of rows are neighbours in `tasks`: take the maximum over them, then
    // weigh each run against it, and add up every run's chunks in key order.
    let mut results: Vec<Attended> = jobs
        .iter()
        .map(|job| Attended {
            out: vec![0.0; job.tokens.len() * heads * d],
            lse: vec![f32::NEG_INFINITY; job.tokens.len() * heads],
        })
        .collect();
    let mut i = 0;
    while i < tasks.len() {
        let same_block = |k: usize| {
            (tasks[k].job, tasks[k].group, tasks[k].rows.start)
                == (tasks[i].job, tasks[i].group, tasks[i].rows.start)
        };
        let mut next = i + 1;
        while next < tasks.len() && same_block(next) {
            next += 1;
        }
        let (max, sums) = match &scored[i] {
            Scored::Whole { max, sums } if next == i + 1 => (*max, sums.clone_sums()),
            _ => {
                let mut max = [f32::NEG_INFINITY; LANES];
                for s in &scored[i..next] {
                    let Scored::Part { max: m, .. } = s else {
                        unreachable!("a block split into runs has parts only")
                    };
                    for (a, b) in max.iter_mut().zip(m) {
                        *a = a.max(*b);
                    }
                }
                let parts: Vec<Vec<ChunkSums>> = (i..next)
                    .into_par_iter()
                    .map(|k| {
                        let Scored::Part { scores, .. } = &scored[k] else {
                            unreachable!("checked above")
                        };
                        weigh_run(d, &tasks[k], scores, &max)
                    })
                    .collect();
                let mut total = ChunkSums::zero(d);
                for chunk in parts.iter().flatten() {
                    total.add(chunk);
                }
                (max, total)
            }
        };
        let task = &tasks[i];
        let result = &mut results[task.job];
        for (l, r) in task.rows.clone().enumerate() {
            let (t, h) = (r / group_size, task.group * group_size + r % group_size);
            let at = t * heads + h;
            let out = &mut result.out[at * d..(at + 1) * d];
            if sums.sum[l] == 0.0 {
                out.fill(0.0);
                continue;
            }
            let inverse = 1.0 / sums.sum[l];
            for (o, a) in out.iter_mut().zip(&sums.acc) {
                *o = a[l] * inverse;
            }
            result.lse[at] = max[l] + sums.sum[l].ln();
        }
        i = next;
    }
    results
}

/// The task's query rows, scaled and transposed into lanes (unused lanes hold zeros and
/// see no key).
fn row_lanes(
    q: &[f32],
    heads: usize,
    d: usize,
    group_size: usize,
    job: &Job<'_>,
    task: &Task<'_>,
) -> RowLanes {
    let mut lanes = RowLanes {
        q: vec![[0.0; LANES]; d],
        seen: [0; LANES],
    };
    for (l, r) in task.rows.clone().enumerate() {
        let t = r / group_size;
        let h = task.group * group_size + r % group_size;
        let row = &q[(job.tokens.start + t) * heads * d + h * d..][..d];
        for (lane, x) in lanes.q.iter_mut().zip(row) {
            lane[l] = x * job.score_scale;
        }
        lanes.seen[l] = job.visible.keys_seen_by(t);
    }
    lanes
}

impl ChunkSums {
    fn zero(d: usize) -> Self {
        ChunkSums {
            sum: [0.0; LANES],
            acc: vec![[0.0; LANES]; d],
        }
    }

    fn clone_sums(&self) -> Self {
        ChunkSums {
            sum: self.sum,
            acc: self.acc.clone(),
        }
    }

    fn add(&mut self, other: &ChunkSums) {
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for (a, b) in self.acc.iter_mut().zip(&other.acc) {
            for (a, b) in a.iter_mut().zip(b) {
                *a += b;
            }
        }
    }
}

/// Score a task's rows against its run of keys; a task with every key of its rows goes on
/// to weigh them.
fn score_task(d: usize, task: &Task<'_>, rows: &RowLanes) -> Scored {
    let mut scores = vec![[0.0; LANES]; task.keys.len()];
    let mut keys = Vec::new();
    for (chunk, out) in (task.keys.start..task.keys.end)
        .step_by(CHUNK)
        .zip(scores.chunks_mut(CHUNK))
    {
        gather(task.spans, d, chunk..chunk + out.len(), |s| s.k, &mut keys);
        lane_kernels::score(&rows.q, &keys, chunk, &rows.seen, out);
    }
    let mut max = [f32::NEG_INFINITY; LANES];
    for s in &scores {
        for (m, s) in max.iter_mut().zip(s) {
            *m = m.max(*s);
        }
    }
    if !task.whole {
        return Scored::Part { max, scores };
    }
    let mut sums = ChunkSums::zero(d);
    for chunk in weigh_run(d, task, &scores, &max) {
        sums.add(&chunk);
    }
    Scored::Whole { max, sums }
}

/// The chunk sums of a task's run of keys against the rows' maximum over all their keys.
fn weigh_run(d: usize, task: &Task<'_>, scores: &[Lanes], max: &Lanes) -> Vec<ChunkSums> {
    let mut values = Vec::new();
    let mut weights = Vec::new();
    (task.keys.start..task.keys.end)
        .step_by(CHUNK)
        .zip(scores.chunks(CHUNK))
        .map(|(chunk, scores)| {
            gather(
                task.spans,
                d,
                chunk..chunk + scores.len(),
                |s| s.v,
                &mut values,
            );
            weights.clear();
            weights.extend_from_slice(scores);
            let mut sums = ChunkSums::zero(d);
            lane_kernels::weigh(&mut weights, max, &values, &mut sums.sum, &mut sums.acc);
            sums
        })
        .collect()
}

/// Keys `range` of a job's key sequence (its spans one after another), each row of `d`
/// taken from a span by `part` and widened to f32, into `out`.
fn gather<'a>(
    spans: &[Span<'a>],
    d: usize,
    range: Range<usize>,
    part: impl Fn(&Span<'a>) -> &'a [f16],
    out: &mut Vec<f32>,
) {
    out.resize(range.len() * d, 0.0);
    let mut filled = 0;
    let mut start = 0;
    for span in spans {
        let len = span.rows(d);
        let (from, to) = (range.start.max(start), range.end.min(start + len));
        if from < to {
            let src = &part(span)[(from - start) * d..(to - start) * d];
            src.convert_to_f32_slice(&mut out[filled..filled + src.len()]);
            filled += src.len();
        }
        start += len;
    }
    assert_eq!(filled, out.len(), "keys outside the spans");
}

/// The arithmetic of attention on lanes of query rows, written once in plain Rust and
/// compiled for the best vector unit the CPU has. Every lane does the same operations in
/// the same order as it would alone, so the instruction set changes speed, not results.
mod lane_kernels {
    use super::{Lanes, LANES};

    /// Keys scored at once: independent chains of multiply-adds to keep the unit busy.
    const KEY_TILE: usize = 8;

    /// `out[j][l]`: the score of key `j` (rows of `d` in `keys`, key `first + j` of the
    /// job) for row `l` of `q`, `-inf` where the row does not see it.
    pub fn score(
        q: &[Lanes],
        keys: &[f32],
        first: usize,
        seen: &[usize; LANES],
        out: &mut [Lanes],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::simd::avx512_available() {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { avx512::score(q, keys, first, seen, out) };
            }
            if crate::kernels::simd::available() {
                // SAFETY: as above.
                return unsafe { score_avx2(q, keys, first, seen, out) };
            }
        }
        score_body(q, keys, first, seen, out)
    }

    /// Turn `scores` into weights `exp(score - max)` in place and add, for each row, the
    /// weights to `sum` and the weighted `values` (rows of `d`) to `acc`, key by key.
    pub fn weigh(
        scores: &mut [Lanes],
        max: &Lanes,
        values: &[f32],
        sum: &mut Lanes,
        acc: &mut [Lanes],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::simd::avx512_available() {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { avx512::weigh(scores, max, values, sum, acc) };
            }
            if crate::kernels::simd::available() {
                // SAFETY: as above.
                return unsafe { weigh_avx2(scores, max, values, sum, acc) };
            }
        }
        weigh_body(scores, max, values, sum, acc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn score_avx2(
        q: &[Lanes],
        keys: &[f32],
        first: usize,
        seen: &[usize; LANES],
        out: &mut [Lanes],
    ) {
        score_body(q, keys, first, seen, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weigh_avx2(
        scores: &mut [Lanes],
        max: &Lanes,
        values: &[f32],
        sum: &mut Lanes,
        acc: &mut [Lanes],
    ) {
        weigh_body(scores, max, values, sum, acc)
    }

    /// The same operations written with AVX-512 intrinsics, one row lane per vector lane:
    /// the compiler does not keep the generic version's tiles in registers.
    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use super::{Lanes, KEY_TILE, LANES, VALUE_TILE};
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        pub unsafe fn score(
            q: &[Lanes],
            keys: &[f32],
            first: usize,
            seen: &[usize; LANES],
            out: &mut [Lanes],
        ) {
            let d = q.len();
            assert_eq!(keys.len(), out.len() * d);
            let seen: [u32; LANES] = seen.map(|s| s.min(u32::MAX as usize) as u32);
            let seen = _mm512_loadu_si512(seen.as_ptr().cast());
            let masked = |s: __m512, key: usize| {
                let visible = _mm512_cmpgt_epu32_mask(seen, _mm512_set1_epi32(key as i32));
                _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), visible, s)
            };
            let (k, o) = (keys.as_ptr(), out.as_mut_ptr().cast::<f32>());
            let n = out.len();
            let mut at = 0;
            while at + KEY_TILE <= n {
                let mut s = [_mm512_setzero_ps(); KEY_TILE];
                for (i, q) in q.iter().enumerate() {
                    let q = _mm512_loadu_ps(q.as_ptr());
                    for (t, s) in s.iter_mut().enumerate() {
                        let key = _mm512_set1_ps(*k.add((at + t) * d + i));
                        *s = _mm512_fmadd_ps(q, key, *s);
                    }
                }
                for (t, s) in s.into_iter().enumerate() {
                    _mm512_storeu_ps(o.add((at + t) * LANES), masked(s, first + at + t));
                }
                at += KEY_TILE;
            }
            while at < n {
                let mut s = _mm512_setzero_ps();
                for (i, q) in q.iter().enumerate() {
                    let key = _mm512_set1_ps(*k.add(at * d + i));
                    s = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr()), key, s);
                }
                _mm512_storeu_ps(o.add(at * LANES), masked(s, first + at));
                at += 1;
            }
        }

        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        pub unsafe fn weigh(
            scores: &mut [Lanes],
            max: &Lanes,
            values: &[f32],
            sum: &mut Lanes,
            acc: &mut [Lanes],
        ) {
            let d = acc.len();
            assert_eq!(values.len(), scores.len() * d);
            let max = _mm512_loadu_ps(max.as_ptr());
            let none = _mm512_cmp_ps_mask(max, _mm512_set1_ps(f32::NEG_INFINITY), _CMP_EQ_OQ);
            let shift = _mm512_mask_mov_ps(max, none, _mm512_setzero_ps());
            let mut total = _mm512_loadu_ps(sum.as_ptr());
            for s in scores.iter_mut() {
                let w = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s.as_ptr()), shift));
                _mm512_storeu_ps(s.as_mut_ptr(), w);
                total = _mm512_add_ps(total, w);
            }
            _mm512_storeu_ps(sum.as_mut_ptr(), total);
            let v = values.as_ptr();
            for (tile, acc) in (0..d).step_by(VALUE_TILE).zip(acc.chunks_mut(VALUE_TILE)) {
                let width = acc.len();
                let mut a = [_mm512_setzero_ps(); VALUE_TILE];
                for (a, acc) in a.iter_mut().zip(acc.iter()) {
                    *a = _mm512_loadu_ps(acc.as_ptr());
                }
                for (j, w) in scores.iter().enumerate() {
                    let w = _mm512_loadu_ps(w.as_ptr());
                    let row = v.add(j * d + tile);
                    if width == VALUE_TILE {
                        for (e, a) in a.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(w, _mm512_set1_ps(*row.add(e)), *a);
                        }
                    } else {
                        for (e, a) in a[..width].iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(w, _mm512_set1_ps(*row.add(e)), *a);
                        }
                    }
                }
                for (a, acc) in a.iter().zip(acc.iter_mut()) {
                    _mm512_storeu_ps(acc.as_mut_ptr(), *a);
                }
            }
        }

        /// The generic `exp_nonpositive`, lane for lane.
        #[inline]
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn exp_nonpositive(x: __m512) -> __m512 {
            let underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0), _CMP_LT_OQ);
            let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
            let n = _mm512_roundscale_ps(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                5.0e-1,
            ] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let y = _mm512_add_ps(
                _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                _mm512_set1_ps(1.0),
            );
            let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            ));
            let y = _mm512_mul_ps(y, _mm512_castsi512_ps(scale));
            _mm512_mask_mov_ps(y, underflow, _mm512_setzero_ps())
        }
    }

    #[inline(always)]
    fn score_body(
        q: &[Lanes],
        keys: &[f32],
        first: usize,
        seen: &[usize; LANES],
        out: &mut [Lanes],
    ) {
        let d = q.len();
        assert_eq!(keys.len(), out.len() * d);
        let mut tiles = keys.chunks_exact(KEY_TILE * d);
        let mut at = 0;
        for tile in tiles.by_ref() {
            let mut s = [[0f32; LANES]; KEY_TILE];
            for (i, q) in q.iter().enumerate() {
                for (k, s) in s.iter_mut().enumerate() {
                    let key = tile[k * d + i];
                    for (s, q) in s.iter_mut().zip(q) {
                        *s = q.mul_add(key, *s);
                    }
                }
            }
            for (k, s) in s.into_iter().enumerate() {
                out[at + k] = masked(s, first + at + k, seen);
            }
            at += KEY_TILE;
        }
        for key in tiles.remainder().chunks_exact(d) {
            let mut s = [0f32; LANES];
            for (q, &key) in q.iter().zip(key) {
                for (s, q) in s.iter_mut().zip(q) {
                    *s = q.mul_add(key, *s);
                }
            }
            out[at] = masked(s, first + at, seen);
            at += 1;
        }
    }

    #[inline(always)]
    fn masked(s: Lanes, key: usize, seen: &[usize; LANES]) -> Lanes {
        std::array::from_fn(|l| {
            if key < seen[l] {
                s[l]
            } else {
                f32::NEG_INFINITY
            }
        })
    }

    /// Value elements one pass keeps in registers for every lane.
    const VALUE_TILE: usize = 16;

    #[inline(always)]
    fn weigh_body(
        scores: &mut [Lanes],
        max: &Lanes,
        values: &[f32],
        sum: &mut Lanes,
        acc: &mut [Lanes],
    ) {
        let d = acc.len();
        assert_eq!(values.len(), scores.len() * d);
        // A row that sees no key has no maximum; its weights are all zero.
        let shift: Lanes = std::array::from_fn(|l| {
            if max[l] == f32::NEG_INFINITY {
                0.0
            } else {
                max[l]
            }
        });
        for s in scores.iter_mut() {
            for ((w, s), m) in s.iter_mut().zip(sum.iter_mut()).zip(&shift) {
                *w = exp_nonpositive(*w - m);
                *s += *w;
            }
        }
        for (tile, acc) in (0..d).step_by(VALUE_TILE).zip(acc.chunks_mut(VALUE_TILE)) {
            let width = acc.len();
            let mut a = [[0f32; LANES]; VALUE_TILE];
            a[..width].copy_from_slice(acc);
            for (w, v) in scores.iter().zip(values.chunks_exact(d)) {
                let v = &v[tile..tile + width];
                for (a, &v) in a.iter_mut().zip(v) {
                    for (a, w) in a.iter_mut().zip(w) {
                        *a = w.mul_add(v, *a);
                    }
                }
            }
            acc.copy_from_slice(&a[..width]);
        }
    }

    /// exp(x) for x <= 0 (or -inf), by range reduction to r in [-ln2/2, ln2/2] and a
    /// degree-6 polynomial (relative error about 2e-7); inputs below -87 give 0.
    #[inline(always)]
    fn exp_nonpositive(x: f32) -> f32 {
        let underflow = x < -87.0;
        let x = x.max(-87.0);
        let n = (x * std::f32::consts::LOG2_E).round_ties_even();
        let r = (-n).mul_add(0.693_145_75, x);
        let r = (-n).mul_add(1.428_606_8e-6, r);
        let mut p: f32 = 1.987_569_1e-4;
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.0e-1,
        ] {
            p = p.mul_add(r, c);
        }
        let y = p.mul_add(r * r, r) + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
        if underflow {
            0.0
        } else {
            y * scale
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn lanes(n: usize, seed: u32) -> Vec<Lanes> {
            let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
            (0..n)
                .map(|_| {
                    std::array::from_fn(|_| {
                        s ^= s << 13;
                        s ^= s >> 17;
                        s ^= s << 5;
                        (s as f32 / u32::MAX as f32) * 4.0 - 2.0
                    })
                })
                .collect()
        }

        #[test]
        fn exp_matches_libm() {
            for i in 0..1000 {
                let x = -(i as f32) * 0.1;
                let (got, want) = (exp_nonpositive(x), x.exp());
                assert!(
                    (got - want).abs() <= 1e-6 * want.max(1e-30),
                    "{x}: {got} vs {want}"
                );
            }
            assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        }

        /// The vector units the CPU has give the portable code's bits.
        #[test]
        fn every_instruction_set_gives_the_same_bits() {
            let (d, keys) = (64, 37);
            let q = lanes(d, 1);
            let k: Vec<f32> = lanes(keys * d / LANES, 2).concat();
            let v: Vec<f32> = lanes(keys * d / LANES, 3).concat();
            let seen: [usize; LANES] = std::array::from_fn(|l| 20 + l);
            let mut portable = vec![[0.0; LANES]; keys];
            score_body(&q, &k, 10, &seen, &mut portable);
            let max: Lanes = std::array::from_fn(|l| {
                portable
                    .iter()
                    .map(|s| s[l])
                    .fold(f32::NEG_INFINITY, f32::max)
            });
            let mut fast = vec![[0.0; LANES]; keys];
            score(&q, &k, 10, &seen, &mut fast);
            assert_eq!(fast, portable);
            let (mut sum, mut acc) = ([0.0; LANES], vec![[0.0; LANES]; d]);
            weigh_body(&mut portable, &max, &v, &mut sum, &mut acc);
            let (mut fast_sum, mut fast_acc) = ([0.0; LANES], vec![[0.0; LANES]; d]);
            weigh(&mut fast, &max, &v, &mut fast_sum, &mut fast_acc);
            assert_eq!((fast, fast_sum, fast_acc), (portable, sum, acc));
        }
    }
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
            ape_attention(&q, heads, &cache, prefix, &refs, factors, 0, &mut out);
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
        ape_attention(&q, heads, &cache, prefix, &refs, unit, 0, &mut ape);

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
        assert_eq!(
            ape, sequential,
            "unit-factor APE is one softmax, to the bit"
        );
    }

    /// A token attended with others (a prefill) or alone (decoding, where the keys are
    /// split between threads) gets the same bits.
    #[test]
    fn a_token_is_attended_alike_alone_and_among_others() {
        let (heads, kv_heads, d) = (14, 2, 64);
        for (past, new) in [(0, 40), (3000, 20), (700, 33)] {
            let full = cache_with(kv_heads, d, past, new, 5);
            let q = values(new * heads * d, 6);
            let mut together = vec![0f32; q.len()];
            causal_attention(&q, heads, &full, 0, &mut together);
            let row = heads * d;
            for i in 0..new {
                // The keys before token i, and its own written after them.
                let mut alone_cache = full.copy_prefix(past, past + i + 1);
                let (mut k, mut v) = (Vec::new(), Vec::new());
                for p in past..past + i + 1 {
                    for g in 0..kv_heads {
                        let (keys, values) = full.head_upto(0, g, past + new);
                        k.extend(keys[p * d..(p + 1) * d].iter().map(|x| x.to_f32()));
                        v.extend(values[p * d..(p + 1) * d].iter().map(|x| x.to_f32()));
                    }
                }
                alone_cache.write(0, &k, &v);
                alone_cache.advance(i);
                let mut alone = vec![0f32; row];
                causal_attention(
                    &q[i * row..(i + 1) * row],
                    heads,
                    &alone_cache,
                    0,
                    &mut alone,
                );
                assert_eq!(
                    alone,
                    together[i * row..(i + 1) * row],
                    "past {past}, token {i}"
                );
            }
        }
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
