//! ape-server: the HTTP face of the engine, for any OpenAI client.
//!
//! Routes (see README for examples):
//! - `POST /v1/chat/completions`: OpenAI's chat API, streamed as server-sent events or
//!   not; with ape's `documents` it answers over them with APE (or parallel, or
//!   sequential: `ape.mode`), reading each document's encoding from the context store;
//! - `POST /v1/completions`, `GET /v1/models`;
//! - `POST /v1/contexts`, `GET|DELETE /v1/contexts/{id}`: register documents once and
//!   refer to them by id afterwards;
//! - `GET /health`, `GET /metrics` (Prometheus).
//!
//! The model is loaded once and shared. A scheduler bounds the requests running and
//! waiting, refusing the rest with 429; a client that disconnects stops its generation;
//! every error is OpenAI's JSON error object with a 4xx status for bad input. The core
//! stays synchronous: model work runs on the blocking thread pool.

mod api;
mod error;
mod metrics;
mod routes;
mod scheduler;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ape_core::engine::Engine;
use ape_store::Store;

pub use error::ApiError;

/// How the server listens and how much work it takes on.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub address: SocketAddr,
    /// Requests running the model at once.
    pub concurrency: usize,
    /// Requests waiting for a slot before new ones are refused with 429.
    pub max_waiting: usize,
    /// A request still running after this long is stopped and answered 504.
    pub request_timeout: Duration,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
}

/// Serve `engine` (whose model clients call `model_id`) until Ctrl-C or SIGTERM; contexts
/// are read from and kept in `store`. Prints the address it listens on once bound.
pub async fn serve(
    engine: Arc<Engine>,
    store: Arc<Store>,
    model_id: String,
    config: ServerConfig,
) -> std::io::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    let state = Arc::new(routes::AppState {
        engine,
        store,
        scheduler: scheduler::Scheduler::new(
            config.concurrency,
            config.max_waiting,
            config.request_timeout,
            metrics.clone(),
        ),
        metrics,
        model_id,
        started: Instant::now(),
    });
    let listener = tokio::net::TcpListener::bind(config.address).await?;
    eprintln!(
        "ape serve: listening on http://{} (model `{}`)",
        listener.local_addr()?,
        state.model_id
    );
    axum::serve(listener, routes::router(state, config.max_body_bytes))
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler installs");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down: finishing the requests in flight");
}
