//! Admission and execution of model work.
//!
//! At most `concurrency` requests run the model at once; up to `max_waiting` more wait
//! their turn in arrival order, and beyond that a request is refused at once with 429 and
//! a `Retry-After`. Everything a request makes the server compute, from tokenizing its
//! text to its last token, runs in its slot on the blocking thread pool (the model itself
//! fans out over rayon), and stops at its next checkpoint when its client goes away or its
//! time is up.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ape_core::engine::generate::Cancel;
use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use crate::error::{ApiError, CLIENT_CLOSED_REQUEST};
use crate::metrics::Metrics;

pub(crate) struct Scheduler {
    slots: Arc<Semaphore>,
    concurrency: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// A request's right to run the model, and its time limit, which starts when the slot
/// is granted and covers every step run in it (tokenizing included). The slot frees, and
/// the timer stops, when it is dropped: after the last step's work has ended.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    timer: AbortHandle,
    timed_out: Arc<AtomicBool>,
    cancel: Cancel,
    /// Whether the request was counted as cancelled (once, whichever step saw it).
    counted: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.timer.abort();
    }
}

/// Stops a request's model work when dropped before the work ends: the handler future or
/// response stream that owns it is dropped when the client disconnects.
pub(crate) struct CancelOnDrop(pub Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Keeps the count of waiting requests right even when a waiting client gives up.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Scheduler {
    pub(crate) fn new(
        concurrency: usize,
        max_waiting: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Scheduler {
            slots: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            waiting: AtomicUsize::new(0),
            max_waiting,
            timeout,
            metrics,
        }
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub(crate) fn running(&self) -> usize {
        self.concurrency - self.slots.available_permits()
    }

    /// A slot now, or after the requests ahead in the queue; 429 when the queue is full.
    /// From then on, `cancel` is raised when the request's time is up.
    pub(crate) async fn admit(&self, cancel: &Cancel) -> Result<Slot, ApiError> {
        let permit =
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
                    let _waiting = Waiting(&self.waiting);
                    if ahead >= self.max_waiting {
                        self.metrics.refused.inc();
                        return Err(ApiError::busy(self.retry_after(ahead)));
                    }
                    self.slots.clone().acquire_owned().await.map_err(|_| {
                        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                    })?
                }
            };
        let timed_out = Arc::new(AtomicBool::new(false));
        let timer = {
            let (cancel, timed_out, limit) = (cancel.clone(), timed_out.clone(), self.timeout);
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                timed_out.store(true, Ordering::SeqCst);
                cancel.cancel();
            })
        };
        Ok(Slot {
            _permit: permit,
            timer: timer.abort_handle(),
            timed_out,
            cancel: cancel.clone(),
            counted: false,
        })
    }

    /// A guess at when a slot will be free: the queue ahead drained at the recent
    /// request rate of every slot.
    fn retry_after(&self, ahead: usize) -> u64 {
        let mean = self.metrics.mean_generation_seconds().unwrap_or(1.0);
        let seconds = mean * (ahead + 1) as f64 / self.concurrency as f64;
        seconds.ceil().clamp(1.0, 60.0) as u64
    }

    /// Run one step of a request's work on the blocking pool while holding `slot`, and
    /// hand the slot back for the next step. The work is expected to check the request's
    /// cancellation and stop with a 499 error; when it stopped because the time limit
    /// passed, the answer is 504.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        slot: Slot,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<(T, Slot), ApiError> {
        let metrics = self.metrics.clone();
        // Counted here rather than after the await: when the client has gone away, the
        // future awaiting this work has been dropped.
        let outcome = tokio::task::spawn_blocking(move || {
            let mut slot = slot;
            let result = work();
            // A client that left is counted once, by the step that ran when it left (or
            // finished after: then no later step runs, the handler being gone).
            let left = slot.cancel.is_cancelled() && !slot.timed_out.load(Ordering::SeqCst);
            if left && !slot.counted {
                slot.counted = true;
                metrics.cancelled.inc();
            }
            (result, slot)
        })
        .await;
        let (result, slot) = outcome.map_err(|e| {
            tracing::error!("model work failed: {e}");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model work for this request failed unexpectedly; see the server log",
            )
        })?;
        match result {
            Err(e)
                if e.status == CLIENT_CLOSED_REQUEST && slot.timed_out.load(Ordering::SeqCst) =>
            {
                self.metrics.timed_out.inc();
                Err(self.timeout_error())
            }
            Err(e) => {
                // The KV budget's refusals are refusals as much as a full queue's.
                if e.status == StatusCode::TOO_MANY_REQUESTS {
                    self.metrics.refused.inc();
                }
                Err(e)
            }
            Ok(value) => Ok((value, slot)),
        }
    }

    pub(crate) fn timeout_error(&self) -> ApiError {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the request took longer than the server's limit of {} s; ask for fewer \
                 tokens or fewer documents, or start the server with a larger \
                 --request-timeout",
                self.timeout.as_secs()
            ),
        )
        .code("timeout")
    }
}
