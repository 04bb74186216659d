//! Running requests together: each step of the batcher's thread is one forward pass
//! ([`Model::forward_batch`]) holding the next token of every request decoding at the
//! moment and at most one chunk of a prompt being read, so that the weights, which a
//! decoding step spends most of its time reading, are read once for all of them, and a
//! prompt being read does not stall the others' decoding.
//!
//! Each request keeps its own loop (sampling, stop strings, streaming, cancellation) and
//! hands its tokens and cache to the batcher's thread, which gathers the tokens of every
//! request decoding at the moment (waiting at most [`GATHER`] for stragglers), runs them
//! with the oldest waiting prompt chunk, and hands each request its logits and cache back.
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
}

impl Reading {
    /// `tokens` run through `model` alone, as this reading says: the logits after the
    /// last, their keys and values appended to `cache`.
    pub(crate) fn forward(&self, model: &Model, tokens: &[u32], cache: &mut KvCache) -> Vec<f32> {
        let contexts = self.contexts();
        let step = Step {
            tokens,
            cache,
            reads: self.reads(&contexts),
        };
        model
            .forward_batch(&mut [step])
            .pop()
            .expect("one step, one row of logits")
    }

    fn contexts(&self) -> Vec<&KvCache> {
        match self {
            Reading::Causal => Vec::new(),
            Reading::Ape { contexts, .. } => contexts.iter().map(Arc::as_ref).collect(),
        }
    }

    fn reads<'a>(&self, contexts: &'a [&'a KvCache]) -> Reads<'a> {
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
        }
    }
}

struct Job {
    tokens: Vec<u32>,
    /// A decoding request's next token, rather than a chunk of a prompt.
    decode: bool,
    cache: KvCache,
    reading: Reading,
    reply: mpsc::Sender<(Vec<f32>, KvCache)>,
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
    pub steps: AtomicU64,
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
            .spawn(move || serve(&model, &received, &members, &counted))
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
        self.submit(vec![token], true, cache, reading)
    }

    /// The logits after `chunk` (at most [`Batcher::chunk_tokens`] tokens of a prompt),
    /// appended to `cache`, computed beside the decoding requests' next tokens.
    pub(crate) fn read(
        &self,
        chunk: &[u32],
        cache: &mut KvCache,
        reading: &Reading,
    ) -> Result<Vec<f32>> {
        self.submit(chunk.to_vec(), false, cache, reading)
    }

    fn submit(
        &self,
        tokens: Vec<u32>,
        decode: bool,
        cache: &mut KvCache,
        reading: &Reading,
    ) -> Result<Vec<f32>> {
        let (reply, answer) = mpsc::channel();
        let job = Job {
            tokens,
            decode,
            cache: std::mem::replace(cache, KvCache::new(0, 0, 0, 0)),
            reading: reading.clone(),
            reply,
        };
        let lost = || Error::Internal("the batched forward pass failed; see the log".into());
        self.jobs.send(job).map_err(|_| lost())?;
        let (logits, back) = answer.recv().map_err(|_| lost())?;
        *cache = back;
        Ok(logits)
    }
}

/// The batcher's loop: gather the decoding requests' tokens, run them with the oldest
/// waiting prompt chunk, reply.
fn serve(model: &Model, jobs: &mpsc::Receiver<Job>, decoding: &AtomicUsize, counts: &DecodeSteps) {
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
        batch.extend(prompts.pop_front());
        // A step that panicked (the panic is printed) drops its replies: its requests end
        // with an error, and the requests after it are served on.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(model, batch)));
    }
}

fn run(model: &Model, batch: Vec<Job>) {
    let mut caches: Vec<KvCache> = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    let mut readings = Vec::with_capacity(batch.len());
    let mut tokens = Vec::with_capacity(batch.len());
    for job in batch {
        caches.push(job.cache);
        replies.push(job.reply);
        readings.push(job.reading);
        tokens.push(job.tokens);
    }
    let contexts: Vec<Vec<&KvCache>> = readings.iter().map(Reading::contexts).collect();
    let mut steps: Vec<Step<'_>> = caches
        .iter_mut()
        .zip(&tokens)
        .zip(readings.iter().zip(&contexts))
        .map(|((cache, tokens), (reading, contexts))| Step {
            tokens,
            cache,
            reads: reading.reads(contexts),
        })
        .collect();
    let logits = model.forward_batch(&mut steps);
    drop(steps);
    for ((reply, logits), cache) in replies.into_iter().zip(logits).zip(caches) {
        // A request that gave up meanwhile no longer listens.
        let _ = reply.send((logits, cache));
    }
}
