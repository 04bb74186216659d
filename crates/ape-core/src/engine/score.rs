//! Teacher-forced scoring: the distribution the model gives each token of a continuation
//! after a prompt, in any mode, for log-likelihoods and for comparing modes.

use std::sync::Arc;

use super::generate::{prefill, Cancel};
use super::recompute::Repaired;
use super::{Engine, Mode, Prompt, Recompute};
use crate::attention::{ApeFactors, KvCache};
use crate::error::{Error, Result};

/// What teacher-forced scoring gives: for each continuation, the logits of each of its
/// tokens.
pub type Scores = Vec<Vec<Vec<f32>>>;

impl Engine {
    /// Teacher-forced scoring: the logits the model gives each token of each of
    /// `continuations` when it follows `prompt` read in `mode` (the prompt is read once,
    /// each continuation after it in turn). Row `i` of a continuation's result is the
    /// distribution `continuation[i]` was drawn from, so there are as many rows as tokens.
    /// For log-likelihoods of answers and for comparing the modes' next-token
    /// distributions.
    pub fn score(&self, prompt: &Prompt, mode: Mode, continuations: &[&[u32]]) -> Result<Scores> {
        let mut scores = self.score_modes(prompt, &[mode], continuations)?;
        Ok(scores.remove(0))
    }

    /// [`Engine::score`] in each of `modes`: the contexts are encoded once, and recomputed
    /// once for each share of them the modes ask for, whatever APE factors go with it (a
    /// calibration's grid, say).
    pub fn score_modes(
        &self,
        prompt: &Prompt,
        modes: &[Mode],
        continuations: &[&[u32]],
    ) -> Result<Vec<Scores>> {
        if prompt.query.is_empty() {
            return Err(Error::EmptyQuery);
        }
        let longest_continuation = continuations.iter().map(|c| c.len()).max().unwrap_or(0);
        let prefix = self.prefix_kv(&prompt.prefix)?;
        let cancel = Cancel::default();
        let mut encoded: Option<Vec<Arc<KvCache>>> = None;
        let mut repaired: Vec<(Recompute, Option<Repaired>)> = Vec::new();
        let mut scores = Vec::with_capacity(modes.len());
        for &mode in modes {
            let Some(factors) = mode.factors() else {
                scores.push(self.score_sequentially(
                    prompt,
                    &prefix,
                    longest_continuation,
                    continuations,
                )?);
                continue;
            };
            if encoded.is_none() {
                let contexts: Vec<&[u32]> = prompt.contexts.iter().map(Vec::as_slice).collect();
                encoded = Some(self.contexts_kv(&prompt.prefix, &prefix, &contexts, &cancel)?);
            }
            let encoded = encoded.as_deref().expect("encoded above");
            let recompute = mode.recompute();
            let at = match repaired.iter().position(|(r, _)| *r == recompute) {
                Some(at) => at,
                None => {
                    let room = prompt.query.len() + longest_continuation;
                    let repair = self.repair(prompt, &prefix, encoded, recompute, room, &cancel)?;
                    repaired.push((recompute, repair));
                    repaired.len() - 1
                }
            };
            scores.push(match &repaired[at].1 {
                Some(repaired) => self.score_encoded(
                    &prefix,
                    &[repaired.contexts.as_ref()],
                    &prompt.query,
                    repaired.factors(factors),
                    continuations,
                )?,
                None => {
                    let encoded: Vec<&KvCache> = encoded.iter().map(Arc::as_ref).collect();
                    self.score_encoded(&prefix, &encoded, &prompt.query, factors, continuations)?
                }
            });
        }
        Ok(scores)
    }

    fn score_sequentially(
        &self,
        prompt: &Prompt,
        prefix: &KvCache,
        longest_continuation: usize,
        continuations: &[&[u32]],
    ) -> Result<Scores> {
        self.check_window(prompt, Mode::Sequential, Some(longest_continuation))?;
        let mut cache = prefix.copy_with_capacity(prompt.total_tokens() + longest_continuation);
        let contexts = prompt.contexts.concat();
        if !contexts.is_empty() {
            prefill(&self.model, &contexts, &mut cache, &Cancel::default())?;
        }
        Ok(score_continuations(
            &prompt.query,
            continuations,
            &mut cache,
            self.model.tokens_per_pass(),
            |tokens, cache, rows| self.model.forward_rows(tokens, cache, rows),
        ))
    }

    /// [`Engine::score`] over contexts already encoded after `prefix`, read with APE
    /// attention and `factors`: no context is read again.
    pub(crate) fn score_encoded(
        &self,
        prefix: &KvCache,
        contexts: &[&KvCache],
        query: &[u32],
        factors: ApeFactors,
        continuations: &[&[u32]],
    ) -> Result<Scores> {
        if query.is_empty() {
            return Err(Error::EmptyQuery);
        }
        Mode::ape(factors.temperature, factors.scale)?;
        let longest_continuation = continuations.iter().map(|c| c.len()).max().unwrap_or(0);
        let longest_context = contexts.iter().map(|c| c.len()).max().unwrap_or(0);
        self.ape_window_check(
            prefix.len(),
            longest_context,
            query.len(),
            Some(longest_continuation),
        )?;
        let mut cache =
            prefix.copy_with_capacity(prefix.len() + query.len() + longest_continuation);
        Ok(score_continuations(
            query,
            continuations,
            &mut cache,
            self.model.tokens_per_pass(),
            |tokens, cache, rows| {
                self.model
                    .forward_ape_rows(tokens, cache, prefix.len(), contexts, factors, rows)
            },
        ))
    }
}

/// Run `query` into `cache`, then each continuation after it (rolled back after each),
/// `tokens_per_pass` at a time, with `forward(tokens, cache, rows)` returning the logits
/// of the last `rows` tokens it runs. Every continuation's first row is the distribution
/// after the query.
fn score_continuations(
    query: &[u32],
    continuations: &[&[u32]],
    cache: &mut KvCache,
    tokens_per_pass: usize,
    mut forward: impl FnMut(&[u32], &mut KvCache, usize) -> Vec<Vec<f32>>,
) -> Vec<Vec<Vec<f32>>> {
    let mut after_query = Vec::new();
    let chunks = query.chunks(tokens_per_pass);
    let last_chunk = chunks.len() - 1;
    for (i, chunk) in chunks.enumerate() {
        after_query = forward(chunk, cache, usize::from(i == last_chunk));
    }
    let after_query = after_query.pop().unwrap_or_default();
    let read = cache.len();
    continuations
        .iter()
        .map(|continuation| {
            let mut rows = Vec::with_capacity(continuation.len());
            if let Some((_, fed)) = continuation.split_last() {
                rows.push(after_query.clone());
                for chunk in fed.chunks(tokens_per_pass) {
                    rows.extend(forward(chunk, cache, chunk.len()));
                }
                cache.truncate(read);
            }
            rows
        })
        .collect()
}
