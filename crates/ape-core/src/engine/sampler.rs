//! Picking the next token from logits: greedy, or sampling with temperature after the
//! usual filters (repetition penalty, top-k, top-p, min-p), from a seeded generator so that
//! a seed reproduces a run.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How the next token is picked. The filters see the probabilities at temperature 1;
/// the temperature then reshapes those they keep. The default is greedy, with llama.cpp's
/// filter settings for when a temperature is given.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens; 1 is off.
    pub repetition_penalty: f32,
    /// How many of the last tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seeds the random generator: the same seed, settings and logits give the same
    /// tokens. Unused when greedy.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Check that each setting is in its range; the error names the first that is not.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Sampling(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0 (0 is greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition penalty must be > 0 (1 is off), got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Picks one request's tokens: its settings and its random generator, seeded once, whose
/// state carries on from token to token.
pub(crate) struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler seeded with `params.seed`; fails if `params` do not validate.
    pub(crate) fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Choose the next token. `history` is every token so far (prompt and generated).
    pub(crate) fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = recent.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }

        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        // Most likely first, ties by id, so that the order is one whichever way it is found.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < candidates.len() {
            // Only the top k need sorting: a vocabulary is 50K to 260K tokens.
            candidates.select_nth_unstable_by(p.top_k - 1, order);
            candidates.truncate(p.top_k);
        }
        candidates.sort_unstable_by(order);
        let probs = softmax(&candidates, 1.0);
        let mut keep = candidates.len();
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, q) in probs.iter().enumerate() {
                mass += q;
                if mass >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        candidates.truncate(keep);

        let probs = softmax(&candidates, p.temperature);
        let mut r: f32 = self.rng.gen();
        for (&(token, _), q) in candidates.iter().zip(&probs) {
            if r < *q {
                return token;
            }
            r -= q;
        }
        candidates.last().expect("at least one candidate").0
    }
}

/// The id of the largest logit (greedy decoding); the lowest id among equals, 0 for no
/// logits.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Probabilities of candidates sorted by descending logit.
fn softmax(candidates: &[(u32, f32)], temperature: f32) -> Vec<f32> {
    let max = candidates[0].1;
    let exps: Vec<f32> = candidates
        .iter()
        .map(|&(_, l)| ((l - max) / temperature).exp())
        .collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(params(0.0)).unwrap();
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 1.9], &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..params(0.0)
        })
        .unwrap();
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 1.9], &[1]), 3);
    }

    #[test]
    fn same_seed_same_tokens_and_filters_hold() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                top_k: 5,
                ..params(1.0)
            })
            .unwrap();
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let mut top5: Vec<u32> = (0..100).collect();
        top5.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        assert!(run(7).iter().all(|t| top5[..5].contains(t)));
        assert!(
            run(7)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1
        );
    }

    #[test]
    fn invalid_settings_are_refused() {
        assert!(Sampler::new(params(-1.0)).is_err());
        assert!(Sampler::new(params(f32::NAN)).is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..params(1.0)
        })
        .is_err());
    }
}
