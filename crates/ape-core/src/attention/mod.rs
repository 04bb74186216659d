//! The key/value cache and the three kinds of attention ape runs over it.
//!
//! - causal attention, of a sequence over itself (sequential encoding);
//! - context attention, of each context encoded after a shared prefix over that prefix and
//!   itself, never over another context;
//! - APE attention, of the query side (the question and every generated token) over two
//!   groups of keys: the contexts, with temperature `T`, and the prefix plus the query side
//!   itself, causally. The two are merged with weights `softmax([S*T*lse_C, lse_O])`.
//!
//! Keys are stored after RoPE, as f16, head-major (`kv_cache`), so one head's keys for
//! consecutive positions are contiguous. All three run on one kernel (`attend`, with the
//! lane arithmetic in `lanes`): a row's result is the same bits whatever the batch around
//! it and however its keys are split between threads, and comes with its log-sum-exp,
//! which is all the APE merge needs. Every softmax is over the keys a query may see and
//! nothing else: no mask values, no padding.

use std::ops::Range;

mod attend;
mod kv_budget;
mod kv_cache;
mod lanes;

pub use kv_budget::{Charge, Evict, KvBudget};
pub use kv_cache::KvCache;

use attend::{attend, Job, Span, Visible, Window};

/// Causal attention of `n` new queries (`q`: n rows of `heads * head_dim`, after RoPE)
/// whose own keys and values are already in `cache` at positions `cache.len()..+n`.
/// Query `i` sees positions `0..=cache.len() + i`, the last `window` of them where the
/// layer has a sliding window. Writes `out`, shaped like `q`.
pub(crate) fn causal_attention(
    q: &[f32],
    heads: usize,
    cache: &KvCache,
    layer: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let n = q.len() / (heads * cache.head_dim);
    let job = Job {
        tokens: 0..n,
        spans: cache.spans_upto(layer, cache.len() + n),
        visible: Visible::Causal { start: cache.len() },
        score_scale: 1.0 / (cache.head_dim as f32).sqrt(),
        window: sliding(window, cache.len()..cache.len() + n, vec![Some(0)]),
    };
    let [done] = attend(q, heads, cache.head_dim, vec![job])
        .try_into()
        .ok()
        .unwrap();
    out.copy_from_slice(&done.out);
}

/// The window of a layer that has one, over tokens at `token_positions` and spans whose
/// first keys sit at `span_positions`.
fn sliding(
    size: Option<usize>,
    token_positions: impl IntoIterator<Item = usize>,
    span_positions: Vec<Option<usize>>,
) -> Option<Window> {
    size.map(|size| Window {
        size,
        token_positions: token_positions.into_iter().collect(),
        span_positions,
    })
}

/// Attention while encoding contexts after a shared prefix, several in one batch: the
/// tokens in rows `rows` of `q` belong to the context whose keys and values `own` already
/// holds, written from its position 0. Each sees the whole `prefix` and the tokens of its
/// own context up to itself, never another context (within `window` positions, where the
/// layer has one: a context sits at the positions after the prefix). Writes `out`, shaped
/// like `q`.
pub(crate) fn context_attention(
    q: &[f32],
    heads: usize,
    prefix: &KvCache,
    contexts: &[(Range<usize>, &KvCache)],
    layer: usize,
    window: Option<usize>,
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
            window: sliding(
                window,
                (0..rows.len()).map(|i| prefix.len() + own.len() + i),
                vec![Some(0), Some(prefix.len())],
            ),
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
/// keep whatever they hold; with a `window`, only its last positions. Writes `out`, shaped
/// like `q`.
pub(crate) fn in_place_attention(
    q: &[f32],
    heads: usize,
    cache: &KvCache,
    positions: &[usize],
    layer: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let upto: Vec<usize> = positions.iter().map(|p| p + 1).collect();
    let job = Job {
        tokens: 0..positions.len(),
        spans: cache.spans_upto(layer, upto.last().copied().unwrap_or(0)),
        visible: Visible::Upto(upto),
        score_scale: 1.0 / (cache.head_dim as f32).sqrt(),
        window: sliding(window, positions.iter().copied(), vec![Some(0)]),
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
    /// `T`: the query side's scores over the contexts are divided by it (below 1
    /// sharpens that attention).
    pub temperature: f32,
    /// `S`: with `T`, multiplies the contexts' log-sum-exp in the merge
    /// (`softmax([S*T*lse_C, lse_O])`), weighting the contexts against the prefix and
    /// the query side.
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
///
/// With a sliding `window` (a local layer), every key is seen only from fewer than
/// `window` positions ahead, by the positions APE gives it: the prefix's from 0, every
/// context's from `prefix_len`, the query side's after the longest context. Writes `out`,
/// shaped like `q`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ape_attention(
    q: &[f32],
    heads: usize,
    cache: &KvCache,
    prefix_len: usize,
    contexts: &[&KvCache],
    factors: ApeFactors,
    layer: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let d = cache.head_dim;
    let n = q.len() / (heads * d);
    let score_scale = 1.0 / (d as f32).sqrt();
    let longest = contexts.iter().map(|c| c.len()).max().unwrap_or(0);
    let query_side = prefix_len + longest;
    let token_positions = (0..n).map(|i| cache.len() + longest + i);
    let context_spans = |g: usize| {
        contexts.iter().map(move |c| {
            let (k, v) = c.head(layer, g);
            Span { k, v }
        })
    };
    let context_positions = vec![Some(prefix_len); contexts.len()];
    // The prefix, then the query side so far and the new tokens: one span each.
    let own_spans = |g: usize| {
        let (k, v) = cache.head_upto(layer, g, cache.len() + n);
        let at = prefix_len * d;
        [
            Span {
                k: &k[..at],
                v: &v[..at],
            },
            Span {
                k: &k[at..],
                v: &v[at..],
            },
        ]
    };
    if factors == ApeFactors::ONE_SOFTMAX {
        let in_order = Job {
            tokens: 0..n,
            spans: (0..cache.kv_heads)
                .map(|g| {
                    let [prefix, query] = own_spans(g);
                    let mut spans = vec![prefix];
                    spans.extend(context_spans(g));
                    spans.push(query);
                    spans
                })
                .collect(),
            visible: Visible::Causal {
                start: cache.len() + contexts.iter().map(|c| c.len()).sum::<usize>(),
            },
            score_scale,
            window: sliding(
                window,
                token_positions,
                [Some(0)]
                    .into_iter()
                    .chain(context_positions)
                    .chain([Some(query_side)])
                    .collect(),
            ),
        };
        let [done] = attend(q, heads, d, vec![in_order]).try_into().ok().unwrap();
        out.copy_from_slice(&done.out);
        return;
    }
    let own = Job {
        tokens: 0..n,
        spans: (0..cache.kv_heads).map(|g| own_spans(g).to_vec()).collect(),
        visible: Visible::Causal { start: cache.len() },
        score_scale,
        window: sliding(
            window,
            token_positions.clone(),
            vec![Some(0), Some(query_side)],
        ),
    };
    let in_contexts = Job {
        tokens: 0..n,
        spans: (0..cache.kv_heads)
            .map(|g| context_spans(g).collect())
            .collect(),
        visible: Visible::All,
        score_scale: score_scale / factors.temperature,
        window: sliding(window, token_positions, context_positions),
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

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
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
    /// With no contexts it is plain causal attention. With a `window`, a key is seen only
    /// from fewer than `window` positions ahead, by APE's positions: the prefix's from 0,
    /// the contexts' from `prefix`, the query side's after the longest context.
    fn dense_reference(
        q: &[f32],
        heads: usize,
        cache: &KvCache,
        prefix: usize,
        contexts: &[&KvCache],
        factors: ApeFactors,
        window: Option<usize>,
    ) -> Vec<f32> {
        let d = cache.head_dim;
        let n = q.len() / (heads * d);
        let group = heads / cache.kv_heads;
        let (t, s) = (factors.temperature as f64, factors.scale as f64);
        let longest = contexts.iter().map(|c| c.len()).max().unwrap_or(0);
        let own_position = |j: usize| if j < prefix { j } else { j + longest };
        let in_window = |query: usize, key: usize| window.is_none_or(|w| query - key < w);
        let mut out = vec![0f32; q.len()];
        for i in 0..n {
            let position = own_position(cache.len() + i);
            for h in 0..heads {
                let g = h / group;
                let q_i = &q[(i * heads + h) * d..][..d];
                let (k, v) = cache.head_upto(0, g, cache.len() + i + 1);
                let seen: Vec<usize> = (0..cache.len() + i + 1)
                    .filter(|&j| in_window(position, own_position(j)))
                    .collect();
                let pick = |rows: &[f16], js: &[usize]| -> Vec<f16> {
                    js.iter()
                        .flat_map(|&j| rows[j * d..(j + 1) * d].iter().copied())
                        .collect()
                };
                let own = scores(q_i, &pick(k, &seen), d);
                let lse_o = log_sum_exp(&own);
                let o_o = weighted_values(
                    &own.iter().map(|s| (s - lse_o).exp()).collect::<Vec<_>>(),
                    &pick(v, &seen),
                    d,
                );
                let mut ctx_scores = Vec::new();
                let mut ctx_values = Vec::new();
                for c in contexts {
                    let (k, v) = c.head(0, g);
                    let seen: Vec<usize> = (0..c.len())
                        .filter(|&j| in_window(position, prefix + j))
                        .collect();
                    ctx_scores.extend(scores(q_i, &pick(k, &seen), d).into_iter().map(|s| s / t));
                    ctx_values.extend(pick(v, &seen));
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
            causal_attention(&q, heads, &cache, 0, None, &mut out);
            let factors = ApeFactors {
                temperature: 1.0,
                scale: 1.0,
            };
            let want = dense_reference(&q, heads, &cache, 0, &[], factors, None);
            assert_close(&out, &want, 1e-5, &format!("past {past} new {new}"));
            for window in [1, 7, 300] {
                causal_attention(&q, heads, &cache, 0, Some(window), &mut out);
                let want = dense_reference(&q, heads, &cache, 0, &[], factors, Some(window));
                let what = format!("past {past} new {new} window {window}");
                assert_close(&out, &want, 1e-5, &what);
            }
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
            window in prop::option::of(1usize..400),
            unit in any::<bool>(),
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
            // Unit factors take the one-softmax path.
            let factors = if unit {
                ApeFactors::ONE_SOFTMAX
            } else {
                ApeFactors { temperature, scale }
            };
            let mut out = vec![0f32; q.len()];
            ape_attention(&q, heads, &cache, prefix, &refs, factors, 0, window, &mut out);
            let want = dense_reference(&q, heads, &cache, prefix, &refs, factors, window);
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
        ape_attention(&q, heads, &cache, prefix, &refs, unit, 0, None, &mut ape);

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
        causal_attention(&q, heads, &joined, 0, None, &mut sequential);
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
            causal_attention(&q, heads, &full, 0, None, &mut together);
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
                    None,
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
        context_attention(&q, heads, &prefix, &batch, 0, None, &mut together);
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
                None,
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
            causal_attention(q_alone, heads, &joined, 0, None, &mut causal);
            assert_close(&alone, &causal, 1e-5, "context attention vs causal");
        }
    }
}
