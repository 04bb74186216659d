//! Decoding requests together: the next token of every request decoding at the same time
//! goes through the model in one pass ([`Model::forward_batch`]), so that the weights,
//! which a decoding step spends most of its time reading, are read once for all of them.
//!
//! Each request keeps its own loop (sampling, stop strings, streaming, cancellation) and
//! hands its token and cache to the batcher's thread, which gathers the tokens of every
//! request decoding at the moment (waiting at most [`GATHER`] for stragglers), runs them,
//! and hands each request its logits and cache back. A request gets the bits it gets
//! alone: no token's products depend on the tokens beside it, and each request's
//! attention is computed on its own.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
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

struct Job {
    token: u32,
    cache: KvCache,
    reading: Reading,
    reply: mpsc::Sender<(Vec<f32>, KvCache)>,
}

pub(crate) struct Batcher {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Requests in their decoding loop: a step waits for this many tokens (or
    /// [`GATHER`]).
    decoding: Arc<AtomicUsize>,
    counts: Arc<DecodeSteps>,
}

/// How many batched decoding steps ran, and how many requests' tokens they held.
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
    /// Start the batcher's thread; it ends when the batcher is dropped.
    pub(crate) fn start(model: Arc<Model>) -> Batcher {
        let (jobs, received) = mpsc::channel();
        let decoding = Arc::new(AtomicUsize::new(0));
        let counts = Arc::new(DecodeSteps::default());
        let (members, counted) = (decoding.clone(), counts.clone());
        std::thread::Builder::new()
            .name("ape-batcher".into())
            .spawn(move || serve(&model, &received, &members, &counted))
            .expect("the batcher thread starts");
        Batcher {
            jobs: Mutex::new(jobs),
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
    /// with it), computed in the next batch.
    pub(crate) fn step(
        &self,
        token: u32,
        cache: &mut KvCache,
        reading: &Reading,
    ) -> Result<Vec<f32>> {
        let (reply, answer) = mpsc::channel();
        let job = Job {
            token,
            cache: std::mem::replace(cache, KvCache::new(0, 0, 0, 0)),
            reading: reading.clone(),
            reply,
        };
        let lost = || Error::Internal("the batched decoding step failed; see the log".into());
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job);
        sent.map_err(|_| lost())?;
        let (logits, back) = answer.recv().map_err(|_| lost())?;
        *cache = back;
        Ok(logits)
    }
}

/// The batcher's loop: gather the waiting requests' tokens, run them, reply.
fn serve(model: &Model, jobs: &mpsc::Receiver<Job>, decoding: &AtomicUsize, counts: &DecodeSteps) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + GATHER;
        while batch.len() < decoding.load(Ordering::SeqCst).min(MAX_BATCH) {
            match jobs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        counts.steps.fetch_add(1, Ordering::Relaxed);
        counts
            .tokens
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
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
        tokens.push([job.token]);
    }
    let contexts: Vec<Vec<&KvCache>> = readings
        .iter()
        .map(|reading| match reading {
            Reading::Causal => Vec::new(),
            Reading::Ape { contexts, .. } => contexts.iter().map(Arc::as_ref).collect(),
        })
        .collect();
    let mut steps: Vec<Step<'_>> = caches
        .iter_mut()
        .zip(&tokens)
        .zip(readings.iter().zip(&contexts))
        .map(|((cache, token), (reading, contexts))| Step {
            tokens: token,
            cache,
            reads: match reading {
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
            },
        })
        .collect();
    let logits = model.forward_batch(&mut steps);
    drop(steps);
    for ((reply, logits), cache) in replies.into_iter().zip(logits).zip(caches) {
        // A request that gave up meanwhile no longer listens.
        let _ = reply.send((logits, cache));
    }
}
