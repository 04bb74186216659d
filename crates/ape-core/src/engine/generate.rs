//! The generation loop: prefill the prompt, then sample one token at a time until an
//! end-of-generation token, a stop string or the token limit, streaming text as it is made.

use std::time::{Duration, Instant};

pub use crate::cancel::Cancel;

use crate::attention::KvCache;
use crate::engine::sampler::{Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// How a request generates: token limit, stop strings, sampling and cancellation. The
/// default is greedy, up to the end of the window, with no stop string.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// At most this many new tokens; `None` allows up to the end of the model's window.
    pub max_tokens: Option<usize>,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// How each new token is picked from the logits.
    pub sampling: SamplingParams,
    /// Lets another thread stop the request; checked between prompt chunks and tokens.
    pub cancel: Cancel,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    EndOfText,
    /// A stop string appeared.
    Stop,
    /// The token limit was reached.
    Length,
}

/// A finished request's answer, with its token counts and timings.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated text, without the prompt and cut before any stop string.
    pub text: String,
    /// The generated token ids: without the end-of-generation token, but with the token
    /// that completed a stop string (so they may spell more than `text`).
    pub tokens: Vec<u32>,
    /// End-of-generation token, stop string or token limit.
    pub finish_reason: FinishReason,
    /// The prompt's length in tokens as sequential reading counts it, reused tokens
    /// included.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused from an earlier request rather
    /// than computed (stored contexts count here even where some of their tokens were then
    /// recomputed).
    pub cached_tokens: usize,
    /// Context tokens whose keys and values were recomputed after the contexts were
    /// loaded (see [`crate::engine::Recompute`]).
    pub recomputed_tokens: usize,
    /// Time from the start of the call to the first sampled token.
    pub time_to_first_token: Duration,
    /// Time spent after the first token.
    pub decode_time: Duration,
}

/// Run `prompt` through `model` in passes of [`Model::tokens_per_pass`] tokens, appending
/// to `cache`; returns the logits after the last prompt token, the only ones computed.
/// `cancel` is checked before each pass.
pub fn prefill(
    model: &Model,
    prompt: &[u32],
    cache: &mut KvCache,
    cancel: &Cancel,
) -> Result<Vec<f32>> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let per_pass = model.tokens_per_pass();
    let last = (prompt.len() - 1) / per_pass * per_pass;
    for piece in prompt[..last].chunks(per_pass) {
        cancel.check()?;
        model.forward_rows(piece, cache, 0);
    }
    cancel.check()?;
    Ok(model.forward(&prompt[last..], cache))
}

/// Everything the token-by-token loop needs once the prompt has been read.
pub(crate) struct Decoding<'a> {
    pub tokenizer: &'a Tokenizer,
    pub options: &'a GenerateOptions,
    pub sampler: Sampler,
    pub max_tokens: usize,
    /// The prompt's tokens, for the repetition penalty; its length is reported as usage.
    pub history: Vec<u32>,
    /// When the request began, for the time to first token.
    pub start: Instant,
}

impl Decoding<'_> {
    /// Sample from `logits`, feed the token to `step` for the next logits, and so on until
    /// an end-of-generation token, a stop string or the token limit.
    pub(crate) fn run(
        mut self,
        mut logits: Vec<f32>,
        mut step: impl FnMut(u32) -> Result<Vec<f32>>,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let prompt_tokens = self.history.len();
        let mut decoder = self.tokenizer.stream_decoder();
        let mut stops = StopMatcher::new(&self.options.stop);
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut first_token_at = None;
        let mut finish_reason = FinishReason::Length;
        while tokens.len() < self.max_tokens {
            self.options.cancel.check()?;
            let token = self.sampler.sample(&mut logits, &self.history);
            first_token_at.get_or_insert_with(|| self.start.elapsed());
            if self.tokenizer.is_eog(token) {
                finish_reason = FinishReason::EndOfText;
                break;
            }
            tokens.push(token);
            self.history.push(token);
            let (ready, stopped) = stops.push(&decoder.push(token)?);
            text.push_str(&ready);
            on_text(&ready);
            if stopped {
                finish_reason = FinishReason::Stop;
                break;
            }
            if tokens.len() < self.max_tokens {
                logits = step(token)?;
            }
        }
        if finish_reason != FinishReason::Stop {
            let (ready, _) = stops.push(&decoder.finish());
            let rest = ready + &stops.flush();
            text.push_str(&rest);
            on_text(&rest);
        }
        let time_to_first_token = first_token_at.unwrap_or_else(|| self.start.elapsed());
        Ok(Generation {
            text,
            tokens,
            finish_reason,
            prompt_tokens,
            cached_tokens: 0,
            recomputed_tokens: 0,
            time_to_first_token,
            decode_time: self.start.elapsed() - time_to_first_token,
        })
    }
}

/// Watches streamed text for stop strings, holding back any tail that could still grow
/// into one.
struct StopMatcher<'a> {
    stops: Vec<&'a str>,
    pending: String,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopMatcher {
            stops: stops
                .iter()
                .map(String::as_str)
                .filter(|s| !s.is_empty())
                .collect(),
            pending: String::new(),
        }
    }

    /// Add text; returns the text that is now safe to emit and whether a stop string was
    /// found (everything from it on is dropped).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let first_stop = self.stops.iter().filter_map(|s| self.pending.find(s)).min();
        if let Some(at) = first_stop {
            let ready = self.pending[..at].to_string();
            self.pending.clear();
            return (ready, true);
        }
        let held = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let ready = self.pending[..held].to_string();
        self.pending.drain(..held);
        (ready, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_pieces_are_caught_and_held_back() {
        let stops = vec!["</end>".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("hello </"), ("hello ".to_string(), false));
        assert_eq!(m.push("e"), (String::new(), false));
        assert_eq!(m.push("nd> tail"), (String::new(), true));
    }

    #[test]
    fn a_false_start_is_released() {
        let stops = vec!["STOP".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("ST"), (String::new(), false));
        assert_eq!(m.push("ay"), ("STay".to_string(), false));
        assert_eq!(m.flush(), "");
    }
}
