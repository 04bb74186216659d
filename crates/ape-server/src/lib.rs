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

#![warn(missing_docs)]

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

/// How the server listens and how much work it takes on.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen; port 0 takes any free port (the one bound is printed).
    pub address: SocketAddr,
    /// Requests running the model at once.
    pub concurrency: usize,
    /// Requests waiting for a slot before new ones are refused with 429.
    pub max_waiting: usize,
    /// A request still running after this long is stopped and answered 504.
    pub request_timeout: Duration,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Longest a connection may take to send a request's headers, or its body, and may
    /// stay open between requests.
    pub idle_timeout: Duration,
    /// The key every request but `GET /health` must send as `Authorization: Bearer KEY`;
    /// none: no authentication.
    pub api_key: Option<String>,
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
        api_key: config
            .api_key
            .as_deref()
            .map(|key| blake3::hash(key.trim().as_bytes())),
    });
    let listener = tokio::net::TcpListener::bind(config.address).await?;
    eprintln!(
        "ape serve: listening on http://{} (model `{}`)",
        listener.local_addr()?,
        state.model_id
    );
    let router = routes::router(state, config.max_body_bytes, config.idle_timeout);
    accept(listener, router, config.idle_timeout, shutdown_signal()).await;
    Ok(())
}

/// Serve connections from `listener` until `shutdown` resolves, then wait for the requests
/// in flight. A connection that does not send a request's headers within `idle` (a new
/// one, or a kept-alive one between requests) is closed.
async fn accept(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    idle: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    // HTTP/1.1 only: with HTTP/2 detection, a connection that sends nothing would wait
    // for its first bytes with no time limit.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait for connections to close.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    graceful.shutdown().await;
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
