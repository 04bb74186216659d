//! The passes ape runs over a model, written once for every family of networks: sequential
//! reading, contexts encoded after a shared prefix, APE's query side over them, tokens
//! recomputed in place, and batches of all of these ([`Model::forward_batch`]). Each
//! supplies the layers' attention (`crate::attention`) with the window of the layer, where
//! the model has local layers; the family's file supplies everything else.

use rayon::prelude::*;

use super::activations;
use super::config::{Architecture, Config};
use super::gemma3::Gemma3;
use super::gguf::Gguf;
use super::llama::Llama;
use super::Network;
use crate::attention::{
    ape_attention, causal_attention, context_attention, in_place_attention, ApeFactors, KvCache,
};
use crate::cancel::Cancel;
use crate::error::Result;
use crate::kernels::{dot_f16, matmul, rms_norm, Rope, RopeAngles};
use half::slice::HalfFloatSliceExt;

/// The activations of one forward pass may take 1/n of the weights' bytes.
const ACTIVATION_SHARE: usize = 64;
/// Tokens per pass come in multiples of the widest kernel tile.
const PASS_GRAIN: usize = 16;
/// Fewer tokens than this would read every weight for too little work (SmolLM2 prefill
/// was 4% slower in passes of 32 tokens than of 512).
const MIN_TOKENS_PER_PASS: usize = 32;
/// More tokens than this gain nothing from sharing the reads.
const MAX_TOKENS_PER_PASS: usize = 512;

/// A loaded model: its hyper-parameters and its network's weights (mapped from the
/// file, or packed for this CPU), ready to run any of the passes.
pub struct Model {
    /// The hyper-parameters read from the file's metadata.
    pub config: Config,
    network: Box<dyn Network>,
}

/// One sequence's part of a [`Model::forward_batch`]: its new tokens, the cache they
/// are appended to, and what they read.
pub(crate) struct Step<'a> {
    /// The new tokens, in order.
    pub(crate) tokens: &'a [u32],
    /// The cache their keys and values are appended to (overwritten in place for
    /// [`Reads::Recompute`], left as it was for [`Reads::Attended`]).
    pub(crate) cache: &'a mut KvCache,
    /// What the tokens attend to besides themselves.
    pub(crate) reads: Reads<'a>,
    /// Whether the step's logits are wanted, where its reading gives any: not for the
    /// pieces of a prompt before its last, since a row of logits reads the whole output
    /// matrix.
    pub(crate) logits: bool,
}

impl Step<'_> {
    fn gives_logits(&self) -> bool {
        self.logits && self.reads.gives_logits()
    }
}

/// What a step's tokens attend to besides themselves.
pub(crate) enum Reads<'a> {
    /// The cache before them, causally ([`Model::forward`]).
    Causal,
    /// The cache (the shared prefix, its first `prefix_len` positions, then the query
    /// side so far) and every context with APE's factors ([`Model::forward_ape`]).
    Ape {
        /// Positions of the cache that hold the shared prefix.
        prefix_len: usize,
        /// Every context, each encoded after the prefix.
        contexts: &'a [&'a KvCache],
        /// APE's temperature and scale.
        factors: ApeFactors,
    },
    /// The cache holds a context encoded after `prefix` (so far): the tokens go on it,
    /// attending to the prefix and to the context up to themselves
    /// ([`Model::extend_context`]).
    Context {
        /// The shared prefix the context was encoded after.
        prefix: &'a KvCache,
    },
    /// The tokens sit at `positions` (increasing, all filled) of the cache and are
    /// recomputed there, each attending causally to every position up to its own
    /// ([`Model::recompute`]); the cache does not grow.
    Recompute {
        /// The cache positions recomputed, one per token.
        positions: &'a [usize],
    },
    /// The tokens (a query) read the cache causally after everything it holds, which it
    /// keeps as it was: what the step gives back is not logits but how much attention
    /// the tokens gave each held position ([`Model::attention_received`]).
    Attended,
}

impl Reads<'_> {
    /// Whether the step's last tokens are read for logits: not when it only keeps keys
    /// and values (a context, recomputed tokens) or gives back attention.
    fn gives_logits(&self) -> bool {
        matches!(self, Reads::Causal | Reads::Ape { .. })
    }

    /// Positions the step's tokens start after, beyond its cache: the longest context's
    /// for APE, the prefix's for a context.
    fn positions_before(&self) -> usize {
        match self {
            Reads::Causal => 0,
            Reads::Ape { contexts, .. } => contexts.iter().map(|c| c.len()).max().unwrap_or(0),
            Reads::Context { prefix } => prefix.len(),
            Reads::Recompute { .. } | Reads::Attended => 0,
        }
    }
}

impl Model {
    /// The model `gguf` holds, its weights read in place from the mapped file or packed
    /// for this CPU; fails on an unsupported architecture, missing or misshapen tensors
    /// or bad metadata.
    pub fn load(gguf: &Gguf) -> Result<Self> {
        let config = Config::from_gguf(gguf)?;
        let network: Box<dyn Network> = match config.architecture {
            Architecture::Llama | Architecture::Qwen2 => Box::new(Llama::load(gguf, &config)?),
            Architecture::Gemma3 => Box::new(Gemma3::load(gguf, &config)?),
        };
        Ok(Model { config, network })
    }

    /// A cache able to hold `capacity` positions (at most the model's window).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(
            c.layers,
            c.kv_heads,
            c.head_dim,
            capacity.min(c.context_length),
        )
    }

    /// Bytes of keys and values `positions` positions take in a cache (f16, every layer).
    pub fn kv_bytes(&self, positions: usize) -> usize {
        let c = &self.config;
        c.layers * 2 * c.kv_heads * c.head_dim * std::mem::size_of::<half::f16>() * positions
    }

    /// Bytes held by the weights.
    pub(crate) fn weight_bytes(&self) -> usize {
        self.network.weight_bytes()
    }

    /// Tokens to run through the model in one forward pass when a prompt or contexts are
    /// read in pieces: enough to share each read of the weights, few enough that the
    /// pass's activations take at most 1/64 of the weights' bytes. At 512 tokens they took
    /// 12% of SmolLM2's 94 MiB of weights, which put a long prompt's peak that far over
    /// the file and its keys and values; a few dozen tokens per pass already share the
    /// weights well (SmolLM2 reads prompts in passes of 80, Gemma 3 270M of 176, Qwen 0.5B
    /// of 160, Qwen 1.5B of 192).
    pub fn tokens_per_pass(&self) -> usize {
        let fit =
            self.weight_bytes() / ACTIVATION_SHARE / activations::bytes_per_token(&self.config);
        (fit / PASS_GRAIN * PASS_GRAIN).clamp(MIN_TOKENS_PER_PASS, MAX_TOKENS_PER_PASS)
    }

    /// Run `tokens` through the model at the positions after what `cache` holds, append
    /// their keys and values to it, and return the logits of the last token.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Vec<f32> {
        let mut rows = self.forward_rows(tokens, cache, 1);
        rows.pop().expect("one row of logits")
    }

    /// [`Model::forward`], returning the logits of each of the last `rows` tokens (in
    /// order) instead of the last one only; with `rows` 0 no logits are computed.
    pub(crate) fn forward_rows(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        rows: usize,
    ) -> Vec<Vec<f32>> {
        let step = Step {
            tokens,
            cache,
            reads: Reads::Causal,
            logits: true,
        };
        self.rows_logits(&self.run_steps(&mut [step], rows).0)
    }

    /// Run several sequences' new tokens through the model in one pass, every weight
    /// matrix read once for all of them, each sequence attending over its own cache as
    /// `reads` says; returns the logits of each sequence's last token (for
    /// [`Reads::Attended`], the attention its cache's positions received; nothing for
    /// [`Reads::Context`] and [`Reads::Recompute`], which only keep keys and values, nor
    /// for a step that wants no logits). A sequence's
    /// keys, values and logits are those [`Model::forward`] or [`Model::forward_ape`] give
    /// it alone: no token's products depend on the tokens beside it, and each sequence's
    /// attention is computed on its own.
    pub(crate) fn forward_batch(&self, steps: &mut [Step<'_>]) -> Vec<Vec<f32>> {
        let (last_rows, mut received) = self.run_steps(steps, 1);
        let mut logits = self.rows_logits(&last_rows).into_iter();
        steps
            .iter()
            .zip(received.iter_mut())
            .map(|(step, r)| match r.take() {
                Some(received) => received,
                None if step.gives_logits() => logits.next().expect("a row of logits per step"),
                None => Vec::new(),
            })
            .collect()
    }

    /// The layers over every step's tokens, each at the positions after its cache (and,
    /// for APE, after the longest context); appends each step's keys and values to its
    /// cache. Returns the hidden states of the last `rows` tokens of each step that gives
    /// logits, steps in order, and for each [`Reads::Attended`] step the attention its
    /// cache's positions received.
    fn run_steps(&self, steps: &mut [Step<'_>], rows: usize) -> (Vec<f32>, Vec<Option<Vec<f32>>>) {
        let tokens: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let mut spans = Vec::with_capacity(steps.len());
        let mut read = Vec::with_capacity(steps.len() * rows);
        let mut positions = Vec::with_capacity(tokens.len());
        for step in steps.iter() {
            if let Reads::Recompute { positions: at } = step.reads {
                assert_eq!(at.len(), step.tokens.len(), "a position per token");
                assert!(
                    at.iter().all(|&p| p < step.cache.len()),
                    "recomputing past the cache"
                );
                positions.extend_from_slice(at);
            } else {
                assert!(
                    step.cache.len() + step.tokens.len() <= step.cache.capacity(),
                    "KV cache overflow"
                );
                let first = step.cache.len() + step.reads.positions_before();
                positions.extend(first..first + step.tokens.len());
            }
            let start = spans.last().map_or(0, |r: &std::ops::Range<usize>| r.end);
            let span = start..start + step.tokens.len();
            if step.gives_logits() {
                read.extend(span.end - rows.min(span.len())..span.end);
            }
            spans.push(span);
        }
        let (heads, d) = (self.config.heads, self.config.head_dim);
        let (q_row, kv_row) = (heads * d, self.config.kv_heads * d);
        let mut received: Vec<Option<Vec<f32>>> = steps
            .iter()
            .map(|s| matches!(s.reads, Reads::Attended).then(|| vec![0f32; s.cache.len()]))
            .collect();
        let config = &self.config;
        let x = self.run_layers_reading(&tokens, positions, &read, |layer, q, k, v, out| {
            let window = config.window(layer);
            let last_layer = !self.attention_read_after(layer);
            for ((step, r), received) in steps.iter_mut().zip(&spans).zip(&mut received) {
                let rows_read = match step.gives_logits() {
                    true => rows.min(r.len()),
                    false => 0,
                };
                let (q, out) = (
                    &q[r.start * q_row..r.end * q_row],
                    &mut out[r.start * q_row..r.end * q_row],
                );
                let (k, v) = (
                    &k[r.start * kv_row..r.end * kv_row],
                    &v[r.start * kv_row..r.end * kv_row],
                );
                match step.reads {
                    Reads::Recompute { positions } => {
                        step.cache.overwrite(layer, positions, k, v);
                    }
                    _ => step.cache.write(layer, k, v),
                }
                // In the last layer, attention is computed only for the rows read after it
                // (and the query's last token's weights where they are the result).
                match &step.reads {
                    Reads::Causal
                    | Reads::Ape { .. }
                    | Reads::Context { .. }
                    | Reads::Recompute { .. }
                        if last_layer && rows_read == 0 => {}
                    Reads::Causal if last_layer && rows_read == 1 && r.len() > 1 => {
                        let at = r.len() - 1;
                        let (q, out) = (&q[at * q_row..], &mut out[at * q_row..]);
                        let position = [step.cache.len() + at];
                        in_place_attention(q, heads, step.cache, &position, layer, window, out);
                    }
                    Reads::Causal => causal_attention(q, heads, step.cache, layer, window, out),
                    Reads::Ape {
                        prefix_len,
                        contexts,
                        factors,
                    } => ape_attention(
                        q,
                        heads,
                        step.cache,
                        *prefix_len,
                        contexts,
                        *factors,
                        layer,
                        window,
                        out,
                    ),
                    Reads::Context { prefix } => {
                        let own = (0..r.len(), &*step.cache);
                        context_attention(q, heads, prefix, &[own], layer, window, out);
                    }
                    Reads::Recompute { positions } => {
                        in_place_attention(q, heads, step.cache, positions, layer, window, out);
                    }
                    Reads::Attended => {
                        if !last_layer {
                            causal_attention(q, heads, step.cache, layer, window, out);
                        }
                        let received = received.as_mut().expect("kept for Attended");
                        if layer >= self.config.layers / 2 {
                            self.add_attention_received(q, step.cache, layer, window, received);
                        }
                    }
                }
            }
        });
        for step in steps.iter_mut() {
            if !matches!(step.reads, Reads::Recompute { .. } | Reads::Attended) {
                step.cache.advance(step.tokens.len());
            }
        }
        (x, received)
    }

    /// Encode contexts independently after a shared prefix, several in one batch: every
    /// context takes positions `prefix.len()..` and attends to the prefix and to itself,
    /// never to another context. Returns each context's keys and values.
    ///
    /// A context's result does not depend on the batch it is in: no token's product
    /// depends on the tokens around it, and attention splits work per context.
    /// `cancel` is checked before each layer.
    pub fn encode_contexts(
        &self,
        prefix: &KvCache,
        contexts: &[&[u32]],
        cancel: &Cancel,
    ) -> Result<Vec<KvCache>> {
        let c = &self.config;
        let mut encoded: Vec<KvCache> = contexts
            .iter()
            .map(|t| KvCache::new(c.layers, c.kv_heads, c.head_dim, t.len()))
            .collect();
        let tokens: Vec<u32> = contexts.concat();
        if tokens.is_empty() {
            return Ok(encoded);
        }
        let mut rows = Vec::with_capacity(contexts.len());
        let mut at = 0;
        for t in contexts {
            rows.push(at..at + t.len());
            at += t.len();
        }
        let positions = contexts
            .iter()
            .flat_map(|t| prefix.len()..prefix.len() + t.len());
        let row = c.kv_heads * c.head_dim;
        self.run_layers_until(&tokens, positions, cancel, |layer, q, k, v, out| {
            for (own, r) in encoded.iter_mut().zip(&rows) {
                own.write(
                    layer,
                    &k[r.start * row..r.end * row],
                    &v[r.start * row..r.end * row],
                );
            }
            if self.attention_read_after(layer) {
                let batch: Vec<_> = rows.iter().cloned().zip(encoded.iter()).collect();
                context_attention(q, c.heads, prefix, &batch, layer, c.window(layer), out);
            }
        })?;
        for (own, t) in encoded.iter_mut().zip(contexts) {
            own.advance(t.len());
        }
        Ok(encoded)
    }

    /// Encode `tokens` as the continuation of a context encoded after `prefix`, whose
    /// first tokens' keys and values `own` holds: the tokens take the positions after
    /// them and attend to the prefix and to the context up to themselves. A context
    /// encoded in pieces this way gets the bits it gets in one piece. `cancel` is checked
    /// before each layer; a cancelled call leaves `own` unusable.
    pub(crate) fn extend_context(
        &self,
        prefix: &KvCache,
        own: &mut KvCache,
        tokens: &[u32],
        cancel: &Cancel,
    ) -> Result<()> {
        assert!(
            own.len() + tokens.len() <= own.capacity(),
            "KV cache overflow"
        );
        let c = &self.config;
        let rows = 0..tokens.len();
        let positions = prefix.len() + own.len()..;
        self.run_layers_until(tokens, positions, cancel, |layer, q, k, v, out| {
            own.write(layer, k, v);
            if self.attention_read_after(layer) {
                let contexts = [(rows.clone(), &*own)];
                context_attention(q, c.heads, prefix, &contexts, layer, c.window(layer), out);
            }
        })?;
        own.advance(tokens.len());
        Ok(())
    }

    /// Run query-side tokens with APE attention: they attend causally to `cache` (the
    /// shared prefix, its first `prefix_len` positions, and the query side so far), and to
    /// all of `contexts` (each encoded after that same prefix) with APE's temperature and
    /// scale. Their positions follow the longest context. Appends their keys and values to
    /// `cache` and returns the logits of the last token.
    pub fn forward_ape(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        prefix_len: usize,
        contexts: &[&KvCache],
        factors: ApeFactors,
    ) -> Vec<f32> {
        let mut rows = self.forward_ape_rows(tokens, cache, prefix_len, contexts, factors, 1);
        rows.pop().expect("one row of logits")
    }

    /// [`Model::forward_ape`], returning the logits of each of the last `rows` tokens (in
    /// order) instead of the last one only; with `rows` 0 no logits are computed.
    pub(crate) fn forward_ape_rows(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        prefix_len: usize,
        contexts: &[&KvCache],
        factors: ApeFactors,
        rows: usize,
    ) -> Vec<Vec<f32>> {
        let step = Step {
            tokens,
            cache,
            reads: Reads::Ape {
                prefix_len,
                contexts,
                factors,
            },
            logits: true,
        };
        self.rows_logits(&self.run_steps(&mut [step], rows).0)
    }

    /// The prefix followed by the contexts one after another, as sequential reading lays
    /// them out, in a cache with room for `capacity` positions: each context's keys are
    /// rotated forward by the lengths of the contexts before it, so that every key stays
    /// consistent with its new position. The values and the tokens' states are those of
    /// parallel encoding: no context has seen another.
    pub(crate) fn lay_out_in_order(
        &self,
        prefix: &KvCache,
        contexts: &[&KvCache],
        capacity: usize,
    ) -> KvCache {
        let mut cache = prefix.copy_with_capacity(capacity);
        let mut offset = 0;
        for context in contexts {
            let angles: Vec<_> = (0..self.config.layers)
                .map(|layer| self.network.rope(layer).angles(std::iter::once(offset)))
                .collect();
            cache.append_mapped(context, |layer, key| {
                self.network.rope(layer).apply(key, &angles[layer], 0);
            });
            offset += context.len();
        }
        cache
    }

    /// Recompute, layer by layer, the keys and values of `tokens`, which sit at `positions`
    /// (increasing, all filled) of `cache`: each attends causally to every position up to
    /// its own, where the other recomputed tokens hold their new keys and values and the
    /// rest keep theirs. Over a cache laid out by [`Model::lay_out_in_order`], recomputing
    /// every context token is sequential reading of the contexts.
    pub(crate) fn recompute(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache,
        cancel: &Cancel,
    ) -> Result<()> {
        let c = &self.config;
        let positions_iter = positions.iter().copied();
        self.run_layers_until(tokens, positions_iter, cancel, |layer, q, k, v, out| {
            cache.overwrite(layer, positions, k, v);
            if self.attention_read_after(layer) {
                in_place_attention(q, c.heads, cache, positions, layer, c.window(layer), out);
            }
        })
    }

    /// Carry a repair over to the tokens it left out: each of `contexts` (position ranges
    /// of `cache`) moves the keys and values of its tokens not among `chosen` (increasing
    /// positions, just recomputed) by `weight` times the mean change its chosen tokens'
    /// took, layer by layer and KV head by KV head; a context none of whose tokens were
    /// chosen stays as it is. `before` holds the chosen positions' keys and values as they
    /// were before, in order. A key's change is compared and carried unrotated, then
    /// turned to the position it is added at. The means are summed in position order, so
    /// the result is the same on every run.
    pub(crate) fn carry_repair(
        &self,
        cache: &mut KvCache,
        before: &KvCache,
        chosen: &[usize],
        contexts: &[std::ops::Range<usize>],
        weight: f32,
    ) {
        let d = cache.head_dim;
        // The layers' rotations, and each distinct one's angles at every position, once.
        let ropes: Vec<&Rope> = (0..self.config.layers)
            .map(|layer| self.network.rope(layer))
            .collect();
        let mut angles: Vec<(&Rope, RopeAngles)> = Vec::new();
        for &rope in &ropes {
            if !angles.iter().any(|(r, _)| std::ptr::eq(*r, rope)) {
                angles.push((rope, rope.angles(0..cache.len())));
            }
        }
        cache.heads_mut().for_each(|(layer, g, k, v)| {
            let rope = ropes[layer];
            let (_, angles) = angles
                .iter()
                .find(|(r, _)| std::ptr::eq(*r, rope))
                .expect("every layer's rotation has its angles");
            let (old_k, old_v) = before.head(layer, g);
            let (mut new, mut old) = (vec![0f32; d], vec![0f32; d]);
            for range in contexts {
                let from = chosen.partition_point(|&p| p < range.start);
                let to = chosen.partition_point(|&p| p < range.end);
                if from == to {
                    continue;
                }
                let (mut shift_k, mut shift_v) = (vec![0f32; d], vec![0f32; d]);
                for (i, &p) in chosen.iter().enumerate().take(to).skip(from) {
                    let pairs = [
                        (true, &*k, old_k, &mut shift_k),
                        (false, &*v, old_v, &mut shift_v),
                    ];
                    for (keys, x, old_x, shift) in pairs {
                        x[p * d..(p + 1) * d].convert_to_f32_slice(&mut new);
                        old_x[i * d..(i + 1) * d].convert_to_f32_slice(&mut old);
                        new.iter_mut().zip(&old).for_each(|(n, o)| *n -= o);
                        if keys {
                            rope.unapply(&mut new, angles, p);
                        }
                        shift.iter_mut().zip(&new).for_each(|(s, c)| *s += c);
                    }
                }
                let scale = weight / (to - from) as f32;
                shift_k
                    .iter_mut()
                    .chain(&mut shift_v)
                    .for_each(|s| *s *= scale);
                for p in range.clone() {
                    if chosen[from..to].binary_search(&p).is_ok() {
                        continue;
                    }
                    old.copy_from_slice(&shift_k);
                    rope.apply(&mut old, angles, p);
                    add_f16(&mut k[p * d..(p + 1) * d], &old, &mut new);
                    add_f16(&mut v[p * d..(p + 1) * d], &shift_v, &mut new);
                }
            }
        });
    }

    /// How much attention `query`, read causally after everything `cache` holds, gives each
    /// of its positions: the softmax weights of the query's last token (the one whose next
    /// token is the answer's first), summed over every head and the later half of the
    /// layers, where a token's weight says what the answer reads rather than where a layer
    /// parks attention it does not need (chosen on SQuAD's dev split: see
    /// `docs/fidelity.md`). `cache` keeps what it held; it needs room for the query.
    pub(crate) fn attention_received(&self, query: &[u32], cache: &mut KvCache) -> Vec<f32> {
        let step = Step {
            tokens: query,
            cache,
            reads: Reads::Attended,
            logits: false,
        };
        self.forward_batch(&mut [step])
            .pop()
            .expect("one step, one result")
    }

    /// Add to `received` (one entry per position `cache` held before the query) the
    /// attention weights one layer gives those positions from the query's last token, over
    /// every head: `q` holds the layer's query rows of every query token, whose own keys
    /// follow the held positions in `cache`, unadvanced. The heads' weights are added in
    /// head order, so the sum, and the choice, are the same on every run.
    fn add_attention_received(
        &self,
        q: &[f32],
        cache: &KvCache,
        layer: usize,
        window: Option<usize>,
        received: &mut [f32],
    ) {
        let c = &self.config;
        let (d, held) = (c.head_dim, received.len());
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let row = c.heads * d;
        let seen = held + q.len() / row;
        let first = window.map_or(0, |w| seen.saturating_sub(w));
        let last_token = &q[q.len() - row..];
        let weights: Vec<Vec<f32>> = last_token
            .par_chunks_exact(d)
            .enumerate()
            .map(|(h, q)| {
                let (keys, _) = cache.head_upto(layer, h / group, seen);
                let mut weights: Vec<f32> = keys[first * d..]
                    .chunks_exact(d)
                    .map(|k| dot_f16(k, q) * scale)
                    .collect();
                let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for w in weights.iter_mut() {
                    *w = (*w - max).exp();
                    sum += *w;
                }
                weights.truncate(held.saturating_sub(first));
                weights.iter_mut().for_each(|w| *w /= sum);
                weights
            })
            .collect();
        for weights in weights {
            for (r, w) in received[first..].iter_mut().zip(weights) {
                *r += w;
            }
        }
    }

    /// Whether a pass that reads no hidden state after the last layer reads `layer`'s
    /// attention: every layer's but the last, whose keys and values are all it keeps.
    fn attention_read_after(&self, layer: usize) -> bool {
        layer + 1 < self.config.layers
    }

    /// The transformer layers over `tokens` at `positions`, with `attend(layer, q, k, v,
    /// out)` supplying attention (it must also keep `k` and `v` wherever it reads keys
    /// from). Returns the hidden states of every token after the last layer.
    pub fn run_layers(
        &self,
        tokens: &[u32],
        positions: impl IntoIterator<Item = usize>,
        attend: impl FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]) + Send,
    ) -> Vec<f32> {
        let every: Vec<usize> = (0..tokens.len()).collect();
        self.run_layers_reading(tokens, positions, &every, attend)
    }

    /// [`Model::run_layers`] for the hidden states of tokens `read` only (increasing
    /// indices), in order: the other tokens stop after the last layer's attention, having
    /// given `attend` their keys and values.
    fn run_layers_reading(
        &self,
        tokens: &[u32],
        positions: impl IntoIterator<Item = usize>,
        read: &[usize],
        attend: impl FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]) + Send,
    ) -> Vec<f32> {
        self.layers(tokens, positions, read, &Cancel::default(), attend)
            .expect("a pass nobody can cancel runs to the end")
    }

    /// The transformer layers over `tokens` at `positions` for their keys and values
    /// alone, which `attend` keeps (no hidden state is read after the last layer),
    /// checking `cancel` before each layer: a cancelled pass stops there with
    /// [`Error::Cancelled`](crate::Error::Cancelled), the caches `attend` writes filled
    /// part way.
    pub fn run_layers_until(
        &self,
        tokens: &[u32],
        positions: impl IntoIterator<Item = usize>,
        cancel: &Cancel,
        attend: impl FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]) + Send,
    ) -> Result<()> {
        self.layers(tokens, positions, &[], cancel, attend)
            .map(drop)
    }

    fn layers(
        &self,
        tokens: &[u32],
        positions: impl IntoIterator<Item = usize>,
        read: &[usize],
        cancel: &Cancel,
        attend: impl FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]) + Send,
    ) -> Result<Vec<f32>> {
        assert!(!tokens.is_empty(), "forward needs at least one token");
        let positions: Vec<usize> = positions.into_iter().take(tokens.len()).collect();
        let mut attend = attend;
        // From a worker thread, each of the ~240 parallel products of a decoded token is
        // split among the workers directly; called from outside the pool, each one would be
        // queued and this thread put to sleep until it is done.
        rayon::scope(|_| {
            self.network
                .run_layers(tokens, &positions, read, cancel, &mut attend)
        })
    }

    /// Logits of the last token of hidden states `x`.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        self.row_logits(&x[x.len() - self.config.hidden..])
    }

    /// Logits of one token's final hidden state.
    fn row_logits(&self, row: &[f32]) -> Vec<f32> {
        self.rows_logits(row)
            .pop()
            .expect("one row, one row of logits")
    }

    /// Logits of each token's final hidden state in `rows` (one after another), in one
    /// product with the output matrix: read once for all of them, and each row's logits
    /// the bits it gets alone.
    fn rows_logits(&self, rows: &[f32]) -> Vec<Vec<f32>> {
        let c = &self.config;
        if rows.is_empty() {
            return Vec::new();
        }
        let (norm, output) = self.network.output();
        let mut rows = rows.to_vec();
        for row in rows.chunks_exact_mut(c.hidden) {
            rms_norm(row, norm, c.rms_eps);
        }
        let mut logits = vec![0f32; rows.len() / c.hidden * c.vocab_size];
        matmul(&rows, output, &mut logits);
        if let Some(cap) = c.logit_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        // The rows are cut off the end, so the first (for one token, the only one) keeps
        // the product's buffer rather than being copied: a row is 0.2 to 1 MB.
        let mut each = Vec::with_capacity(logits.len() / c.vocab_size);
        while logits.len() > c.vocab_size {
            each.push(logits.split_off(logits.len() - c.vocab_size));
        }
        logits.shrink_to_fit();
        each.push(logits);
        each.reverse();
        each
    }
}

/// `x += shift`, each sum rounded back to f16 (`scratch`: room for `x` widened).
fn add_f16(x: &mut [half::f16], shift: &[f32], scratch: &mut [f32]) {
    x.convert_to_f32_slice(scratch);
    scratch.iter_mut().zip(shift).for_each(|(a, s)| *a += s);
    x.convert_from_f32_slice(scratch);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2, the smallest test model: only its shape and rotations are used here.
    fn smollm2() -> Model {
        let dir = std::env::var_os("APE_MODELS_DIR").map_or_else(
            || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"),
            std::path::PathBuf::from,
        );
        let path = dir.join("smollm2-135m-instruct-q4_1.gguf");
        let gguf = Gguf::open(&path).expect("the test model is installed (`ape model pull`)");
        Model::load(&gguf).unwrap()
    }

    #[test]
    fn a_repair_is_carried_to_the_other_tokens_of_each_context_it_touched() {
        let model = smollm2();
        let c = &model.config;
        let (d, row) = (c.head_dim, c.kv_heads * c.head_dim);
        // The prefix at 0..4, the first context at 4..10, later contexts at 10..20 and
        // 20..30, a third at 30..36 with nothing recomputed.
        let len = 36;
        let contexts = [10..20, 20..30, 30..36];
        let chosen = [12, 15, 16, 25];
        let mut cache = model.new_cache(len);
        let angles = model.network.rope(0).angles(0..len);
        let raw = |p: usize, i: usize| ((p * 31 + i * 7) % 23) as f32 / 23.0 - 0.5;
        for layer in 0..c.layers {
            let mut k: Vec<f32> = (0..len * row).map(|i| raw(i / row, i % row)).collect();
            for (p, key) in k.chunks_exact_mut(row).enumerate() {
                model.network.rope(layer).apply(key, &angles, p);
            }
            let v: Vec<f32> = (0..len * row).map(|i| raw(i / row, i % row + 1)).collect();
            cache.write(layer, &k, &v);
        }
        cache.advance(len);
        let before = cache.gather(&chosen, chosen.len());
        // The chosen tokens of each later context change by one unrotated key change and
        // one value change per context (and head element), as if recomputed.
        let key_change = |p: usize, i: usize| if p < 20 { 0.25 + i as f32 / 64.0 } else { -0.5 };
        let value_change = |p: usize, i: usize| if p < 20 { 0.125 * (i % 3) as f32 } else { 1.0 };
        cache.heads_mut().for_each(|(layer, _, k, v)| {
            let mut scratch = vec![0f32; d];
            for &p in &chosen {
                let mut change: Vec<f32> = (0..d).map(|i| key_change(p, i)).collect();
                model.network.rope(layer).apply(&mut change, &angles, p);
                add_f16(&mut k[p * d..(p + 1) * d], &change, &mut scratch);
                let change: Vec<f32> = (0..d).map(|i| value_change(p, i)).collect();
                add_f16(&mut v[p * d..(p + 1) * d], &change, &mut scratch);
            }
        });
        let repaired = cache.clone();
        model.carry_repair(&mut cache, &before, &chosen, &contexts, 0.5);

        for layer in 0..c.layers {
            for g in 0..c.kv_heads {
                let (k, v) = cache.head(layer, g);
                let (k0, v0) = repaired.head(layer, g);
                for p in 0..len {
                    let (at, carried) = (p * d..(p + 1) * d, (10..30).contains(&p));
                    if !carried || chosen.contains(&p) {
                        assert_eq!(k[at.clone()], k0[at.clone()], "key {p} moved");
                        assert_eq!(v[at.clone()], v0[at], "value {p} moved");
                        continue;
                    }
                    let mut want: Vec<f32> = (0..d).map(|i| 0.5 * key_change(p, i)).collect();
                    model.network.rope(layer).apply(&mut want, &angles, p);
                    for i in 0..d {
                        let moved = k[p * d + i].to_f32() - k0[p * d + i].to_f32();
                        assert!(
                            (moved - want[i]).abs() < 2e-3,
                            "key {p}[{i}]: {moved} {}",
                            want[i]
                        );
                        let moved = v[p * d + i].to_f32() - v0[p * d + i].to_f32();
                        let want = 0.5 * value_change(p, i);
                        assert!(
                            (moved - want).abs() < 2e-3,
                            "value {p}[{i}]: {moved} {want}"
                        );
                    }
                }
            }
        }
    }
}
