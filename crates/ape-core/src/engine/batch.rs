//! Running requests together: each step of the batcher's thread is one forward pass
//! ([`Model::forward_batch`]) holding the next token of every request decoding at the
//! moment and prompt work of at most `chunk_tokens` tokens (chunks of prompts, queries, a
//! prefix read for the first time, documents being encoded, the query's pass that picks
//! the document tokens to recompute, and those tokens recomputed), so that the weights,
//! which a decoding step spends most of its time reading, are read once for all of them,
//! and a prompt being read does not stall the others' decoding.
//!
//! Each request keeps its own loop (sampling, stop strings, streaming, cancellation) and
//! hands its tokens and caches to the batcher's thread, which gathers the tokens of every
//! request decoding at the moment (waiting at most [`GATHER`] for stragglers), runs them
//! with the oldest waiting prompt work, and hands each request its logits and caches back.
//! A request gets the bits it gets alone: no token's products depend on the tokens beside
//! it, prompts give the same keys and values in chunks of any size, and each request's
//! attention is computed on its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::attention::{ApeFactors, KvCache};
use crate::error::{Error, Result};
use crate::model::{Model, Reads, Step};

/// Longest a step waits for the other decoding requests' tokens before it runs without
/// them: they are usually a sampling step behind.
const GATHER: Duration = Duration::from_millis(5);

/// Most requests' tokens in one step.
const MAX_BATCH: usize = 64;

/// What a request's decoded tokens read besides its own cache; see [`Reads`].
#[derive(Clone)]
pub(crate) enum Reading {
    Causal,
    Ape {
        prefix_len: usize,
        contexts: Arc<[Arc<KvCache>]>,
        factors: ApeFactors,
    },
    Context {
        prefix: Arc<KvCache>,
    },
    Recompute {
        positions: Arc<[usize]>,
    },
    /// The step gives back the attention each held position received, not logits.
    Attended,
}

impl Reading {
    /// `tokens` run through `model` alone, as this reading says: the logits after the
    /// last, their keys and values appended to `cache`.
    pub(crate) fn forward(&self, model: &Model, tokens: &[u32], cache: &mut KvCache) -> Vec<f32> {
        self.alone(model, tokens, cache, true)
            .pop()
            .expect("one step, one row of logits")
    }

    /// [`Reading::forward`] without the logits: for the pieces of a prompt before its
    /// last, whose logits nobody reads.
    pub(crate) fn extend(&self, model: &Model, tokens: &[u32], cache: &mut KvCache) {
        self.alone(model, tokens, cache, false);
    }

    /// `tokens` run as the one step of a batch, read as this reading says.
    fn alone(
        &self,
        model: &Model,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: bool,
    ) -> Vec<Vec<f32>> {
        let contexts = self.contexts();
        let step = Step {
            tokens,
            cache,
            reads: self.reads(&contexts),
            logits,
        };
        model.forward_batch(&mut [step])
    }

    fn contexts(&self) -> Vec<&KvCache> {
        match self {
            Reading::Ape { contexts, .. } => contexts.iter().map(Arc::as_ref).collect(),
            Reading::Causal
            | Reading::Context { .. }
            | Reading::Recompute { .. }
            | Reading::Attended => Vec::new(),
        }
    }

    fn reads<'a>(&'a self, contexts: &'a [&'a KvCache]) -> Reads<'a> {
        match self {
            Reading::Causal => Reads::Causal,
            Reading::Ape {
                prefix_len,
                factors,
                ..
            } => Reads::Ape {
                prefix_len: *prefix_len,
                contexts,
                factors: *factors,
            },
            Reading::Context { prefix } => Reads::Context { prefix },
            Reading::Recompute { positions } => Reads::Recompute { positions },
            Reading::Attended => Reads::Attended,
        }
    }
}

/// One sequence's tokens in a step.
struct Part {
    tokens: Vec<u32>,
    cache: KvCache,
    reading: Reading,
    /// Whether its logits are wanted (see [`Step::logits`]).
    logits: bool,
}

/// One request's work for a step: its next token, or prompt work (several sequences when
/// it encodes several documents).
struct Job {
    parts: Vec<Part>,
    /// A decoding request's next token, rather than prompt work.
    decode: bool,
    reply: mpsc::Sender<Vec<(Vec<f32>, KvCache)>>,
}

impl Job {
    fn tokens(&self) -> usize {
        self.parts.iter().map(|p| p.tokens.len()).sum()
    }
}

pub(crate) struct Batcher {
    jobs: mpsc::Sender<Job>,
    /// Most prompt tokens in one step.
    pub(crate) chunk_tokens: usize,
    /// Requests in their decoding loop: a step waits for this many tokens (or
    /// [`GATHER`]).
    decoding: Arc<AtomicUsize>,
    counts: Arc<DecodeSteps>,
}

/// How many batched steps ran, and how many decoding requests' tokens they held.
#[derive(Debug, Default)]
pub struct DecodeSteps {
    /// Steps that held at least one decoding request's token, since the batcher started.
    pub steps: AtomicU64,
    /// Decoding tokens summed over those steps: divided by `steps`, the mean batch size.
    pub tokens: AtomicU64,
}

/// A request's membership of the batch while it decodes.
pub(crate) struct Member<'a>(&'a Batcher);

impl Drop for Member<'_> {
    fn drop(&mut self) {
        self.0.decoding.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Start the batcher's thread, reading prompts `chunk_tokens` at a time; it ends when
    /// the batcher is dropped.
    pub(crate) fn start(model: Arc<Model>, chunk_tokens: usize) -> Batcher {
        let (jobs, received) = mpsc::channel();
        let decoding = Arc::new(AtomicUsize::new(0));
        let counts = Arc::new(DecodeSteps::default());
        let (members, counted) = (decoding.clone(), counts.clone());
        std::thread::Builder::new()
            .name("ape-batcher".into())
            .spawn(move || serve(&model, chunk_tokens, &received, &members, &counted))
            .expect("the batcher thread starts");
        Batcher {
            jobs,
            chunk_tokens,
            decoding,
            counts,
        }
    }

    pub(crate) fn counts(&self) -> &DecodeSteps {
        &self.counts
    }

    /// Count a request as decoding until the returned guard is dropped.
    pub(crate) fn join(&self) -> Member<'_> {
        self.decoding.fetch_add(1, Ordering::SeqCst);
        Member(self)
    }

    /// The logits after `token`, appended to `cache` (whose keys and values come back
    /// with it), computed in the next step.
    pub(crate) fn decode(
        &self,
        token: u32,
        cache: &mut KvCache,
        reading: &Reading,
    ) -> Result<Vec<f32>> {
        self.submit(&mut [(&[token], cache)], true, true, reading)
            .map(|mut logits| logits.remove(0))
    }

    /// The logits after `chunk` (at most [`Batcher::chunk_tokens`] tokens of a prompt),
    /// appended to `cache`, computed beside the decoding requests' next tokens.
    pub(crate) fn read(
        &self,
        chunk: &[u32],
        cache: &mut KvCache,
        reading: &Reading,
    ) -> Result<Vec<f32>> {
        self.submit(&mut [(chunk, cache)], false, true, reading)
            .map(|mut logits| logits.remove(0))
    }

    /// [`Batcher::read`] for a piece of a prompt before its last: no logits.
    pub(crate) fn extend(
        &self,
        chunk: &[u32],
        cache: &mut KvCache,
        reading: &Reading,
    ) -> Result<()> {
        self.submit(&mut [(chunk, cache)], false, false, reading)
            .map(drop)
    }

    /// Each piece's tokens appended to its cache as `reading` says, all in one step
    /// (together at most [`Batcher::chunk_tokens`] tokens): documents encoded side by side.
    pub(crate) fn read_together(
        &self,
        pieces: &mut [(&[u32], &mut KvCache)],
        reading: &Reading,
    ) -> Result<()> {
        self.submit(pieces, false, false, reading).map(drop)
    }

    fn submit(
        &self,
        pieces: &mut [(&[u32], &mut KvCache)],
        decode: bool,
        logits: bool,
        reading: &Reading,
    ) -> Result<Vec<Vec<f32>>> {
        let (reply, answer) = mpsc::channel();
        let parts = pieces
            .iter_mut()
            .map(|(tokens, cache)| Part {
                tokens: tokens.to_vec(),
                cache: std::mem::replace(*cache, KvCache::new(0, 0, 0, 0)),
                reading: reading.clone(),
                logits,
            })
            .collect();
        let job = Job {
            parts,
            decode,
            reply,
        };
        let lost = || Error::Internal("the batched forward pass failed; see the log".into());
        self.jobs.send(job).map_err(|_| lost())?;
        let results = answer.recv().map_err(|_| lost())?;
        let mut all_logits = Vec::with_capacity(results.len());
        for ((_, cache), (logits, back)) in pieces.iter_mut().zip(results) {
            **cache = back;
            all_logits.push(logits);
        }
        Ok(all_logits)
    }
}

/// The batcher's loop: gather the decoding requests' tokens, run them with the oldest
/// waiting prompt work (as much as fits `chunk_tokens`, at least one request's), reply.
fn serve(
    model: &Model,
    chunk_tokens: usize,
    jobs: &mpsc::Receiver<Job>,
    decoding: &AtomicUsize,
    counts: &DecodeSteps,
) {
    let mut prompts: VecDeque<Job> = VecDeque::new();
    loop {
        let mut batch = Vec::new();
        let take = |job: Job, batch: &mut Vec<Job>, prompts: &mut VecDeque<Job>| match job.decode {
            true => batch.push(job),
            false => prompts.push_back(job),
        };
        if prompts.is_empty() {
            match jobs.recv() {
                Ok(job) => take(job, &mut batch, &mut prompts),
                Err(_) => return,
            }
        }
        let deadline = Instant::now() + GATHER;
        while batch.len() < decoding.load(Ordering::SeqCst).min(MAX_BATCH) {
            match jobs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => take(job, &mut batch, &mut prompts),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            counts.steps.fetch_add(1, Ordering::Relaxed);
            counts
                .tokens
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        let mut prompt_tokens = 0;
        while let Some(job) = prompts.front() {
            if prompt_tokens > 0 && prompt_tokens + job.tokens() > chunk_tokens {
                break;
            }
            prompt_tokens += job.tokens();
            batch.extend(prompts.pop_front());
        }
        // A step that panicked (the panic is printed) drops its replies: its requests end
        // with an error, and the requests after it are served on.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(model, batch)));
    }
}

fn run(model: &Model, batch: Vec<Job>) {
    let mut caches: Vec<KvCache> = Vec::new();
    let mut readings = Vec::new();
    let mut wanted = Vec::new();
    let mut tokens = Vec::new();
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        replies.push((job.reply, job.parts.len()));
        for part in job.parts {
            caches.push(part.cache);
            readings.push(part.reading);
            wanted.push(part.logits);
            tokens.push(part.tokens);
        }
    }
    let contexts: Vec<Vec<&KvCache>> = readings.iter().map(Reading::contexts).collect();
    let mut steps: Vec<Step<'_>> = caches
        .iter_mut()
        .zip(&tokens)
        .zip(readings.iter().zip(&contexts).zip(wanted))
        .map(|((cache, tokens), ((reading, contexts), logits))| Step {
            tokens,
            cache,
            reads: reading.reads(contexts),
            logits,
        })
        .collect();
    let logits = model.forward_batch(&mut steps);
    drop(steps);
    let mut results = logits.into_iter().zip(caches);
    for (reply, parts) in replies {
        let results: Vec<(Vec<f32>, KvCache)> = results.by_ref().take(parts).collect();
        // A request that gave up meanwhile no longer listens.
        let _ = reply.send(results);
    }
}
