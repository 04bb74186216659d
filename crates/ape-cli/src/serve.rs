//! `ape serve`: the OpenAI-compatible HTTP server (see the `ape-server` crate).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use ape_server::ServerConfig;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    /// Address to listen on; 0.0.0.0 to accept other machines.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on; 0 picks a free one (printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests in flight at once, their decoding batched together (each holds its KV
    /// cache meanwhile). 32 gave the most answers per second under 32 clients on two cores.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests waiting for a slot; beyond this, new ones are refused with 429.
    #[arg(long, default_value_t = 32)]
    queue: usize,
    /// Seconds a request may run before it is stopped and answered 504.
    #[arg(long, default_value_t = 300)]
    request_timeout: u64,
    /// Largest request body accepted (e.g. 512K, 16M); larger ones are answered 413.
    #[arg(long, default_value = "16M", value_parser = crate::store::parse_size)]
    max_body: u64,
    /// Most prompt tokens read in one step of the batch; the decoding requests' next
    /// tokens wait for that step, so smaller keeps their pace steadier, larger reads
    /// prompts sooner.
    #[arg(long, default_value_t = 256)]
    max_batch_tokens: usize,
    /// Seconds a connection may take to send a request's headers, or its body (408), and
    /// may stay open between requests; slower connections are closed.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
    /// Memory for keys and values (e.g. 4G): every running request's cache, the contexts
    /// it encodes, the kept prompts and the store's memory tier share it. A request that
    /// does not fit beside the running ones is answered 429; one larger than all of it,
    /// 400. By default half of the memory available at start.
    #[arg(long, value_parser = crate::store::parse_size)]
    kv_memory: Option<u64>,
    /// Require this key on every request but `GET /health`, sent as `Authorization:
    /// Bearer KEY` (OpenAI clients' `api_key`); best given through the environment, where
    /// other users' `ps` does not show it.
    #[arg(long, env = "APE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Read every chat from scratch instead of reusing the keys and values of the start
    /// it shares with a recent one (the conversation so far).
    #[arg(long)]
    no_prompt_reuse: bool,
    #[command(flatten)]
    store: crate::store::StoreArgs,
}

pub(crate) fn run(args: ServeArgs) -> Result<()> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(
        args.max_body > 0,
        "--max-body must be at least 1 byte (every request has a JSON body)"
    );
    anyhow::ensure!(
        args.idle_timeout > 0,
        "--idle-timeout must be at least 1 second"
    );
    anyhow::ensure!(
        args.request_timeout > 0,
        "--request-timeout must be at least 1 second"
    );
    if let Some(key) = &args.api_key {
        anyhow::ensure!(
            !key.trim().is_empty(),
            "--api-key (APE_API_KEY) is empty; give a key, or leave it out to serve without one"
        );
    }
    let path = &args.model.model;
    let mut engine = args.model.load()?.with_batching(args.max_batch_tokens);
    if let Some(bytes) = args.kv_memory {
        anyhow::ensure!(bytes > 0, "--kv-memory must be more than 0 bytes");
        engine = engine.with_kv_memory(usize::try_from(bytes).unwrap_or(usize::MAX));
    }
    if !args.no_prompt_reuse {
        engine = engine.with_prompt_reuse();
    }
    let store = args.store.open_with_memory(&engine, path)?;
    let engine = Arc::new(engine.with_store(store.clone()));
    let model_id = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ape".to_string());
    let config = ServerConfig {
        address: SocketAddr::new(args.host, args.port),
        concurrency: args.concurrency,
        max_waiting: args.queue,
        request_timeout: Duration::from_secs(args.request_timeout),
        max_body_bytes: usize::try_from(args.max_body).unwrap_or(usize::MAX),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        api_key: args.api_key,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the server's async runtime")?;
    runtime
        .block_on(ape_server::serve(engine, store, model_id, config))
        .with_context(|| format!("serving on {}:{}", args.host, args.port))
}
