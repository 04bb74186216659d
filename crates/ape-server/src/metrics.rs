//! What `GET /metrics` reports, in Prometheus's text format: requests by route and status,
//! request duration, time to first token, time per output token, decode speed, tokens in
//! and out, queue depth, and the context store's hits and misses per tier.

use std::time::Duration;

use ape_core::engine::generate::Generation;
use ape_core::engine::Engine;
use ape_store::Store;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Latency buckets from 5 ms to 2 minutes.
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Per-token latency buckets from 1 ms to 1 s.
const TOKEN_SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];
/// Decode speed buckets, tokens per second.
const TOKENS_PER_SECOND: &[f64] = &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0];

pub(crate) struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub generation_seconds: Histogram,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub decode_tokens_per_second: Histogram,
    pub prompt_tokens: IntCounter,
    pub cached_prompt_tokens: IntCounter,
    pub recomputed_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub refused: IntCounter,
    pub cancelled: IntCounter,
    pub timed_out: IntCounter,
    queue_depth: IntGauge,
    running: IntGauge,
    decode_steps: IntCounter,
    decode_step_tokens: IntCounter,
    kv_memory: IntGauge,
    kv_memory_used: IntGauge,
    store_hits: IntCounterVec,
    store_misses: IntCounterVec,
    store_corrupt: IntCounterVec,
    uptime: Gauge,
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let metrics = Metrics {
            registry: Registry::new(),
            requests: counter_vec(
                "ape_requests_total",
                "HTTP requests answered, by route and status code.",
                &["route", "status"],
            ),
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "ape_request_duration_seconds",
                    "Time from a request's arrival to its response's headers (for a stream, its start).",
                )
                .buckets(SECONDS.to_vec()),
                &["route"],
            )
            .expect("valid histogram"),
            generation_seconds: histogram(
                "ape_generation_seconds",
                "Model time per request: reading the prompt and generating the answer.",
                SECONDS,
            ),
            time_to_first_token: histogram(
                "ape_time_to_first_token_seconds",
                "Time from the start of model work to the first generated token.",
                SECONDS,
            ),
            time_per_output_token: histogram(
                "ape_time_per_output_token_seconds",
                "Mean time between generated tokens, per request.",
                TOKEN_SECONDS,
            ),
            decode_tokens_per_second: histogram(
                "ape_decode_tokens_per_second",
                "Generated tokens per second after the first, per request.",
                TOKENS_PER_SECOND,
            ),
            prompt_tokens: IntCounter::new("ape_prompt_tokens_total", "Prompt tokens read.")
                .expect("valid counter"),
            cached_prompt_tokens: IntCounter::new(
                "ape_cached_prompt_tokens_total",
                "Prompt tokens not read again: a kept prefix, stored documents, an earlier turn.",
            )
            .expect("valid counter"),
            recomputed_tokens: IntCounter::new(
                "ape_recomputed_tokens_total",
                "Context tokens whose keys and values were recomputed over the other contexts.",
            )
            .expect("valid counter"),
            generated_tokens: IntCounter::new(
                "ape_generated_tokens_total",
                "Tokens generated.",
            )
            .expect("valid counter"),
            refused: IntCounter::new(
                "ape_requests_refused_total",
                "Requests refused with 429: the queue was full, or the KV budget could not hold them.",
            )
            .expect("valid counter"),
            cancelled: IntCounter::new(
                "ape_requests_cancelled_total",
                "Requests whose client went away before the answer was complete.",
            )
            .expect("valid counter"),
            timed_out: IntCounter::new(
                "ape_requests_timed_out_total",
                "Requests stopped by the per-request time limit.",
            )
            .expect("valid counter"),
            queue_depth: IntGauge::new(
                "ape_queue_depth",
                "Requests waiting for a generation slot.",
            )
            .expect("valid gauge"),
            running: IntGauge::new("ape_running_requests", "Requests running the model.")
                .expect("valid gauge"),
            decode_steps: IntCounter::new(
                "ape_decode_steps_total",
                "Decoding steps run, each one forward pass for every request decoding then.",
            )
            .expect("valid counter"),
            decode_step_tokens: IntCounter::new(
                "ape_decode_step_tokens_total",
                "Tokens decoded in those steps (divided by the steps: the mean batch).",
            )
            .expect("valid counter"),
            kv_memory: IntGauge::new(
                "ape_kv_memory_bytes",
                "The budget for keys and values (--kv-memory).",
            )
            .expect("valid gauge"),
            kv_memory_used: IntGauge::new(
                "ape_kv_memory_used_bytes",
                "Keys and values charged to the budget: running requests and kept caches.",
            )
            .expect("valid gauge"),
            store_hits: counter_vec(
                "ape_store_hits_total",
                "Context lookups answered by a store tier.",
                &["tier"],
            ),
            store_misses: counter_vec(
                "ape_store_misses_total",
                "Context lookups a store tier could not answer.",
                &["tier"],
            ),
            store_corrupt: counter_vec(
                "ape_store_corrupt_total",
                "Damaged entries found (and deleted) in a store tier.",
                &["tier"],
            ),
            uptime: Gauge::new("ape_uptime_seconds", "Seconds since the server started.")
                .expect("valid gauge"),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.request_seconds.clone()),
            Box::new(metrics.generation_seconds.clone()),
            Box::new(metrics.time_to_first_token.clone()),
            Box::new(metrics.time_per_output_token.clone()),
            Box::new(metrics.decode_tokens_per_second.clone()),
            Box::new(metrics.prompt_tokens.clone()),
            Box::new(metrics.cached_prompt_tokens.clone()),
            Box::new(metrics.recomputed_tokens.clone()),
            Box::new(metrics.generated_tokens.clone()),
            Box::new(metrics.refused.clone()),
            Box::new(metrics.cancelled.clone()),
            Box::new(metrics.timed_out.clone()),
            Box::new(metrics.queue_depth.clone()),
            Box::new(metrics.running.clone()),
            Box::new(metrics.decode_steps.clone()),
            Box::new(metrics.decode_step_tokens.clone()),
            Box::new(metrics.kv_memory.clone()),
            Box::new(metrics.kv_memory_used.clone()),
            Box::new(metrics.store_hits.clone()),
            Box::new(metrics.store_misses.clone()),
            Box::new(metrics.store_corrupt.clone()),
            Box::new(metrics.uptime.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// Record a finished generation.
    pub(crate) fn generated(&self, generation: &Generation) {
        self.prompt_tokens.inc_by(generation.prompt_tokens as u64);
        self.cached_prompt_tokens
            .inc_by(generation.cached_tokens as u64);
        self.recomputed_tokens
            .inc_by(generation.recomputed_tokens as u64);
        self.generated_tokens.inc_by(generation.tokens.len() as u64);
        let first = generation.time_to_first_token.as_secs_f64();
        self.time_to_first_token.observe(first);
        self.generation_seconds
            .observe(first + generation.decode_time.as_secs_f64());
        let after_first = generation.tokens.len().saturating_sub(1);
        if after_first > 0 {
            let seconds = generation.decode_time.as_secs_f64();
            self.time_per_output_token
                .observe(seconds / after_first as f64);
            self.decode_tokens_per_second
                .observe(after_first as f64 / seconds.max(1e-9));
        }
    }

    pub(crate) fn finished(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.request_seconds
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// Mean model time of the requests answered so far, for `Retry-After`.
    pub(crate) fn mean_generation_seconds(&self) -> Option<f64> {
        let count = self.generation_seconds.get_sample_count();
        (count > 0).then(|| self.generation_seconds.get_sample_sum() / count as f64)
    }

    /// The text `GET /metrics` returns, with the gauges and the store's counts read now.
    pub(crate) fn render(
        &self,
        waiting: usize,
        running: usize,
        store: &Store,
        engine: &Engine,
        uptime: Duration,
    ) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        self.queue_depth.set(waiting as i64);
        let budget = engine.kv_budget();
        self.kv_memory.set(budget.limit() as i64);
        self.kv_memory_used.set(budget.used() as i64);
        if let Some(counts) = engine.decode_steps() {
            let sync =
                |counter: &IntCounter, now: u64| counter.inc_by(now.saturating_sub(counter.get()));
            sync(&self.decode_steps, counts.steps.load(Relaxed));
            sync(&self.decode_step_tokens, counts.tokens.load(Relaxed));
        }
        self.running.set(running as i64);
        self.uptime.set(uptime.as_secs_f64());
        for tier in store.stats() {
            let sync = |counter: &IntCounterVec, now: u64| {
                let counter = counter.with_label_values(&[tier.name]);
                counter.inc_by(now.saturating_sub(counter.get()));
            };
            sync(&self.store_hits, tier.hits.load(Relaxed));
            sync(&self.store_misses, tier.misses.load(Relaxed));
            sync(&self.store_corrupt, tier.corrupt.load(Relaxed));
        }
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("text encoding never fails");
        String::from_utf8(text).expect("Prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
