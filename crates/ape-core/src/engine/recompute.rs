//! Recomputing a share of the context tokens over the contexts laid out in order, before
//! the query reads them ([`Recompute`]): which tokens, at which positions, and what the
//! query then reads plainly and what with APE's factors.

use super::batch::Reading;
use super::{Engine, Prompt, Recompute, Selection};
use crate::attention::KvCache;
use crate::engine::generate::Cancel;
use crate::error::{Error, Result};

/// A request's keys and values after recomputation, in the two groups APE's query side
/// reads: `own`, the prefix and the recomputed context tokens, read like the prefix; and
/// `rest`, the context tokens left as they were encoded, read with APE's temperature and
/// scale. The query side's positions start after both, where sequential reading puts them.
pub(super) struct Repaired {
    pub(super) own: KvCache,
    pub(super) rest: KvCache,
    pub(super) recomputed: usize,
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
        contexts: &[&KvCache],
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
        let query = prompt.query.len();
        let mut cache = self
            .model
            .lay_out_in_order(prefix, contexts, p + total + query);
        let share_of = |n: usize| ((recompute.share * n as f32).ceil() as usize).min(n);
        let chosen: Vec<usize> = match recompute.selection {
            Selection::First => {
                let mut chosen = Vec::new();
                let mut start = p;
                for context in contexts {
                    chosen.extend(start..start + share_of(context.len()));
                    start += context.len();
                }
                chosen
            }
            Selection::Attended => {
                let received = self.attention_received(&prompt.query, &mut cache, cancel)?;
                let mut ranked: Vec<usize> = (p..p + total).collect();
                ranked.sort_by(|&a, &b| received[b].total_cmp(&received[a]).then(a.cmp(&b)));
                ranked.truncate(share_of(total));
                ranked.sort_unstable();
                ranked
            }
        };
        let tokens = prompt.sequential_tokens();
        let chunk = self
            .batcher
            .as_ref()
            .map_or(crate::engine::generate::PREFILL_CHUNK, |b| b.chunk_tokens);
        for positions in chosen.chunks(chunk) {
            let chunk: Vec<u32> = positions.iter().map(|&at| tokens[at]).collect();
            self.recompute_in_place(&chunk, positions, &mut cache, cancel)?;
        }
        let mut is_chosen = vec![false; p + total];
        chosen.iter().for_each(|&at| is_chosen[at] = true);
        let own: Vec<usize> = (0..p).chain(chosen.iter().copied()).collect();
        let rest: Vec<usize> = (p..p + total).filter(|&at| !is_chosen[at]).collect();
        Ok(Some(Repaired {
            own: cache.gather(&own, own.len()),
            rest: cache.gather(&rest, rest.len()),
            recomputed: chosen.len(),
        }))
    }
}
