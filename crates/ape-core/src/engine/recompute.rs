//! Recomputing a share of the context tokens over the contexts laid out in order, before
//! the query reads them ([`Recompute`]): which tokens, at which positions, how the change
//! they took carries over to the tokens left as they were, and with which factors the
//! query then reads them.

use std::sync::Arc;

use super::batch::Reading;
use super::{Engine, Prompt, Recompute, Selection};
use crate::attention::{ApeFactors, KvCache};
use crate::engine::generate::Cancel;
use crate::error::{Error, Result};

/// The contexts of a request laid out in order after the prefix, a share of their tokens
/// recomputed over everything before them: one context, which the query side reads as APE
/// reads contexts, with the factors [`Repaired::factors`] gives. The query side's
/// positions start after it, where sequential reading puts them.
pub(super) struct Repaired {
    pub(super) contexts: Arc<KvCache>,
    /// Tokens run through the model again.
    pub(super) recomputed: usize,
    /// The share of the context tokens asked for, which the factors are moved by (fewer
    /// are run again where the first context would have taken some: it has sequential's
    /// keys and values already).
    repaired: f32,
}

/// How much of the mean change its recomputed tokens took a later context's other tokens
/// are moved by ([`Model::carry_repair`](crate::model::Model)): half, chosen on SQuAD's dev
/// split, where it read closer to sequential than none, a quarter or all of it (see
/// `docs/fidelity.md`, Carrying the repair over).
const CARRIED: f32 = 0.5;

impl Repaired {
    /// `factors` moved towards 1 by the square root of the share asked for.
    /// Tokens that have seen the other contexts need less of APE's correction, and with
    /// every token recomputed there is nothing left to correct: T = S = 1 exactly, one
    /// softmax over the prefix, the contexts in order and the query side, which is
    /// sequential reading. (Reading the repaired tokens plainly and the rest with the
    /// factors gave the query a split no reading gives: on many-shot requests at T 0.3 it
    /// moved answers away from sequential's; see `docs/fidelity.md`.)
    pub(super) fn factors(&self, factors: ApeFactors) -> ApeFactors {
        let kept = 1.0 - self.repaired.sqrt();
        let toward_one = |x: f32| 1.0 - (1.0 - x) * kept;
        ApeFactors {
            temperature: toward_one(factors.temperature),
            scale: toward_one(factors.scale),
        }
    }
}

impl Engine {
    /// [`Model::recompute`](crate::model::Model), in a step of the batch when batching.
    fn recompute_in_place(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache,
        cancel: &Cancel,
    ) -> Result<()> {
        let Some(batcher) = &self.batcher else {
            return self.model.recompute(tokens, positions, cache, cancel);
        };
        cancel.check()?;
        let reading = Reading::Recompute {
            positions: positions.into(),
        };
        batcher.read(tokens, cache, &reading).map(drop)
    }

    /// [`Model::attention_received`](crate::model::Model), in a step of the batch when
    /// batching.
    fn attention_received(
        &self,
        query: &[u32],
        cache: &mut KvCache,
        cancel: &Cancel,
    ) -> Result<Vec<f32>> {
        cancel.check()?;
        match &self.batcher {
            Some(batcher) => batcher.read(query, cache, &Reading::Attended),
            None => Ok(self.model.attention_received(query, cache)),
        }
    }

    /// Recompute the share of `prompt`'s context tokens that `recompute` asks for, over
    /// their keys and values `contexts` (encoded after `prefix`), leaving `room` positions
    /// for the query side; `None` when nothing is to be recomputed, or when the contexts
    /// laid out in order would not leave that room in the window. See [`Recompute`].
    /// `cancel` is checked before each layer of the passes that select and recompute.
    ///
    /// Not on a model with local layers: the two groups hold tokens of scattered positions,
    /// which the sliding window cannot yet be told.
    pub(super) fn repair(
        &self,
        prompt: &Prompt,
        prefix: &KvCache,
        contexts: &[Arc<KvCache>],
        recompute: Recompute,
        room: usize,
        cancel: &Cancel,
    ) -> Result<Option<Repaired>> {
        if recompute.share > 0.0 && self.model.config.sliding_window.is_some() {
            return Err(Error::ApeSetting(format!(
                "recomputing context tokens is not supported yet on models with sliding-window \
                 layers ({}); ask for a recompute share of 0",
                self.model.config.architecture.name()
            )));
        }
        let p = prefix.len();
        let total: usize = contexts.iter().map(|c| c.len()).sum();
        let fits = p + total + room <= self.model.config.context_length;
        if recompute.share == 0.0 || total == 0 || !fits {
            return Ok(None);
        }
        let asked = ((recompute.share * total as f32).ceil() as usize).min(total);
        let repaired = asked as f32 / total as f32;
        // The first context keeps the positions it was encoded at, after the prefix alone,
        // which is all it sees in sequential reading too: its keys and values are already
        // sequential's, and recomputing them would give them back. The share is spent on
        // the contexts after it; with none, nothing is run again and only the reading
        // moves.
        let Some((first_context, after_first)) = contexts.split_first() else {
            return Ok(None);
        };
        if after_first.is_empty() {
            return Ok(Some(Repaired {
                contexts: first_context.clone(),
                recomputed: 0,
                repaired,
            }));
        }
        let query = prompt.query.len();
        let borrowed: Vec<&KvCache> = contexts.iter().map(Arc::as_ref).collect();
        let mut cache = self
            .model
            .lay_out_in_order(prefix, &borrowed, p + total + query);
        let first = p + first_context.len();
        let later = total - first_context.len();
        let budget = asked.min(later);
        let mut later_contexts = Vec::with_capacity(after_first.len());
        let mut start = first;
        for context in after_first {
            later_contexts.push(start..start + context.len());
            start += context.len();
        }
        let chosen: Vec<usize> = match recompute.selection {
            Selection::First => {
                let share = budget as f32 / later.max(1) as f32;
                let mut chosen = Vec::new();
                for context in &later_contexts {
                    let n = ((share * context.len() as f32).ceil() as usize).min(context.len());
                    chosen.extend(context.start..context.start + n);
                }
                chosen.truncate(budget);
                chosen
            }
            Selection::Attended => {
                let received = self.attention_received(&prompt.query, &mut cache, cancel)?;
                let mut ranked: Vec<usize> = (first..p + total).collect();
                ranked.sort_by(|&a, &b| received[b].total_cmp(&received[a]).then(a.cmp(&b)));
                ranked.truncate(budget);
                ranked.sort_unstable();
                ranked
            }
        };
        let tokens = prompt.sequential_tokens();
        let chunk = self
            .batcher
            .as_ref()
            .map_or_else(|| self.model.tokens_per_pass(), |b| b.chunk_tokens);
        let before = cache.gather(&chosen, chosen.len());
        for positions in chosen.chunks(chunk) {
            let chunk: Vec<u32> = positions.iter().map(|&at| tokens[at]).collect();
            self.recompute_in_place(&chunk, positions, &mut cache, cancel)?;
        }
        self.model
            .carry_repair(&mut cache, &before, &chosen, &later_contexts, CARRIED);
        Ok(Some(Repaired {
            contexts: Arc::new(cache.gather(&(p..p + total).collect::<Vec<_>>(), total)),
            recomputed: chosen.len(),
            repaired,
        }))
    }
}
